"""The schema of a host project whose own views keep simplejwt's ``JWTAuthentication``
while the gateway authenticates with ``CachedJWTAuthentication``: one ``jwtAuth``
component, and no drf-spectacular warning (the README's quickstart is such a project;
``tests/system/test_install.py`` caught the warning there)."""

from __future__ import annotations

import pytest
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def test_simplejwt_and_the_cached_class_are_one_scheme_without_a_warning(settings, tmp_path):
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_AUTHENTICATION_CLASSES": [
            "rest_framework_simplejwt.authentication.JWTAuthentication",
            "rest_framework.authentication.SessionAuthentication",
        ],
    }
    out = tmp_path / "schema.yml"
    call_command("spectacular", "--fail-on-warn", "--file", str(out))  # a warning raises
    schema = out.read_text()
    assert "jwtAuth:" in schema and schema.count("scheme: bearer") >= 1
