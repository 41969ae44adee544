# A proxy of the user model for the admin's list of every user (no table). Written
# by hand from makemigrations' output so that it follows AUTH_USER_MODEL (swappable)
# instead of naming auth.User.

from django.conf import settings
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
        ("llm_quota", "0003_override_unlimited_and_default_tier"),
    ]

    operations = [
        migrations.CreateModel(
            name="QuotaUser",
            fields=[],
            options={
                "verbose_name": "user",
                "verbose_name_plural": "users",
                "proxy": True,
                "indexes": [],
                "constraints": [],
            },
            bases=(settings.AUTH_USER_MODEL,),
            managers=[],
        ),
    ]
