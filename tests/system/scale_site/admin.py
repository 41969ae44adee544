"""What an admin does, from another process: ``python -m tests.system.scale_site.admin``.

    seed <tier> key=value...   a tier (limits), gpt-4o's price, a user on it: prints its pk
    edit <tier> key=value...   change a tier through the model, as the admin's save does
    price <model> <in> <out>   a price row (multipliers)
    token <pk>                 an access token for that user, as /api/token/ issues it
    key <pk> key=value...      an API key of that user (its limits): prints "<id> <key>"
    revoke <key id>            revoke an API key, as DELETE /api/llm-quota/keys/<id>/ does
    deactivate <pk>            set a user's is_active to False, as the admin's save does
    delete <pk>                delete a user
    estimate <model> <max_tokens> <messages-json>   the request's estimate in base tokens
"""

from __future__ import annotations

import os
import sys

import django


def _limits(pairs: list[str]) -> dict[str, int | None]:
    values: dict[str, int | None] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        values[name] = None if value in ("", "none") else int(value)
    return values


def main(argv: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.system.scale_site.settings")
    django.setup()
    from decimal import Decimal

    from django.contrib.auth import get_user_model

    from llm_quota.models import ModelPrice, Tier, UserQuota

    command, name, *pairs = argv
    if command == "seed":
        ModelPrice.objects.get_or_create(
            model="gpt-4o",
            defaults={"input_multiplier": Decimal(1), "output_multiplier": Decimal(4)},
        )
        tier = Tier.objects.create(name=name, **_limits(pairs))
        user = get_user_model().objects.create_user(f"user-{name}")
        UserQuota.objects.create(user=user, tier=tier)
        print(user.pk)
    elif command == "price":
        inp, out = pairs
        ModelPrice.objects.create(
            model=name, input_multiplier=Decimal(inp), output_multiplier=Decimal(out)
        )
    elif command == "token":
        from llm_quota.contrib.jwt.tokens import ScopedTokenObtainPairSerializer

        user = get_user_model().objects.get(pk=int(name))
        print(ScopedTokenObtainPairSerializer.get_token(user).access_token)
    elif command == "key":
        from llm_quota.models import ApiKey

        key = ApiKey(user_id=int(name), name="scale", **_limits(pairs))
        plaintext = key.issue()
        key.save()
        print(key.pk, plaintext)
    elif command == "revoke":
        from django.utils import timezone

        from llm_quota.models import ApiKey

        key = ApiKey.objects.get(pk=int(name))
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    elif command == "deactivate":
        user = get_user_model().objects.get(pk=int(name))
        user.is_active = False
        user.save()
    elif command == "delete":
        get_user_model().objects.get(pk=int(name)).delete()
    elif command == "estimate":
        import json

        from llm_quota.quota.admission import estimate_request

        cap, messages = pairs
        estimate = estimate_request(name, messages=json.loads(messages), max_tokens=int(cap))
        print(estimate.base_tokens)
    elif command == "edit":
        tier = Tier.objects.get(name=name)
        for field, value in _limits(pairs).items():
            setattr(tier, field, value)
        tier.save()
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
