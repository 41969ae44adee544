"""Admin forms: validation the models cannot express alone.

The model fields already refuse negative or zero limits and multipliers, and the
models' ``clean`` refuses patterns that do not compile; these forms add what needs
the other rows (a default tier for users without a quota) or other libraries (model names the
ledger accepts, tiktoken encodings that exist).
"""

from __future__ import annotations

import fnmatch
import re
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django import forms
from django.utils.translation import gettext_lazy as _

from llm_quota.conf import quota_settings
from llm_quota.ledger.keys import is_valid_model_name
from llm_quota.management.price_file import multiplier
from llm_quota.models import ModelPrice, Tier

if TYPE_CHECKING:
    from django_stubs_ext import StrOrPromise  # a lazy translation or a str

# What may appear in a model name (keys.py), plus fnmatch's own syntax.
_PATTERN_CHARS = re.compile(r"[A-Za-z0-9._:/@+*?\[\]!-]+")


def validate_model_pattern(pattern: str) -> None:
    """A model name or fnmatch pattern that compiles and can match some model name.

    Python's fnmatch escapes almost anything into a valid regex, so "compiles" alone
    catches little: an empty range (``[z-a]``) compiles to a never-matching regex, and
    a space can never occur in a model name. Both are typos worth refusing.
    """
    try:
        regex = fnmatch.translate(pattern)
        re.compile(regex)
    except re.error as exc:  # pragma: no cover - kept for other Python versions
        raise forms.ValidationError(f"{pattern!r}: {exc}") from exc
    if not _PATTERN_CHARS.fullmatch(pattern):
        raise forms.ValidationError(
            _("%(p)r can never match: model names use letters, digits and ._:/@+-") % {"p": pattern}
        )
    if "(?!)" in regex:
        raise forms.ValidationError(
            _("%(p)r can never match: it has an empty character range") % {"p": pattern}
        )


class TierForm(forms.ModelForm):
    upgrade_url = forms.URLField(
        label=_("Upgrade URL"), required=False, assume_scheme="https", max_length=200
    )

    class Meta:
        model = Tier
        fields = "__all__"
        help_texts = {
            "soft_limit_percent": _(
                "The share of the monthly budget past which the soft_limit_crossed signal "
                "(and the alert webhook) fires, once a month, and the admin's bars turn amber."
            ),
        }

    def clean_allowed_models(self) -> str:
        text = self.cleaned_data.get("allowed_models", "")
        errors = []
        for line in text.splitlines():
            if line.strip():
                try:
                    validate_model_pattern(line.strip())
                except forms.ValidationError as exc:
                    errors.extend(exc.messages)
        if errors:
            raise forms.ValidationError(errors)
        return text

    #: Set by ``clean`` when this tier became the default because it is the first one.
    made_default = False

    def clean(self) -> dict[str, Any]:
        """Users without a UserQuota need a tier: the one marked default, else the one
        named by ``DEFAULT_TIER`` (rules/policy.py). The first tier becomes the default;
        a later one may leave the default unticked only where ``DEFAULT_TIER`` names a
        tier that then applies."""
        super().clean()
        cleaned = self.cleaned_data  # what ModelForm.clean returns
        if cleaned.get("is_default"):
            return cleaned
        others = Tier.objects.exclude(pk=self.instance.pk)
        if not others.exists():
            cleaned["is_default"] = self.made_default = True
            return cleaned
        fallback = quota_settings.DEFAULT_TIER
        named = cleaned.get("name") == fallback or others.filter(name=fallback).exists()
        if not others.filter(is_default=True).exists() and not named:
            self.add_error(
                "is_default",
                _(
                    "Users without a user quota need a default tier: tick Default here or "
                    "on another tier, or name a tier %(name)r (the DEFAULT_TIER setting)."
                )
                % {"name": fallback},
            )
        return cleaned


def base_token_usd() -> Decimal:
    """What a million base tokens cost (``BASE_TOKEN_USD_PER_MILLION``), as a Decimal."""
    return Decimal(str(quota_settings.BASE_TOKEN_USD_PER_MILLION))


def usd_per_million(stored: Decimal) -> Decimal:
    """A multiplier as USD per million tokens: exact (a Decimal product), no exponent,
    no trailing zeros, so a form shows ``0.15`` and not ``0.150000`` or ``1.5E-1``."""
    usd = Decimal(stored) * base_token_usd()
    return Decimal(f"{usd.normalize():f}")


#: The USD fields of the price form and the multiplier each one sets.
USD_FIELDS = {
    "input_usd": "input_multiplier",
    "output_usd": "output_multiplier",
    "cached_input_usd": "cached_input_multiplier",
}
#: ``ModelPrice``'s multipliers keep 12 digits, 6 after the point.
_MAX_MULTIPLIER = Decimal("999999.999999")


def _usd_field(label: StrOrPromise, help_text: StrOrPromise = "") -> forms.DecimalField:
    return forms.DecimalField(
        label=label, required=False, min_value=Decimal("0"), decimal_places=10,
        max_digits=22, widget=forms.NumberInput(attrs={"step": "any"}), help_text=help_text,
    )  # fmt: skip


class ModelPriceForm(forms.ModelForm):
    """Prices are entered as providers publish them, in USD per million tokens; the
    stored multiplier (base tokens per token) is that price over
    ``BASE_TOKEN_USD_PER_MILLION``, rounded up to its six places as
    ``llm_quota_load_prices`` rounds it (never under-charging). A USD price left as it
    was leaves its multiplier to the multiplier field, for who edits that directly."""

    # Labelled short: the fieldset's title says "USD per 1M tokens".
    input_usd = _usd_field(_("Input"))
    output_usd = _usd_field(_("Output"))
    cached_input_usd = _usd_field(
        _("Cached input"), _("Empty: cached input tokens cost the input price.")
    )

    class Meta:
        model = ModelPrice
        fields = "__all__"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for usd, stored in USD_FIELDS.items():
            if usd not in self.fields or stored not in self.fields:
                continue
            value = self.get_initial_for_field(self.fields[stored], stored)
            if value not in (None, ""):
                self.initial[usd] = usd_per_million(Decimal(value))

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data  # what ModelForm.clean returns
        for usd_name, stored_name in USD_FIELDS.items():
            usd = cleaned.get(usd_name)
            if usd is None or usd_name not in self.changed_data:
                continue  # left alone: the multiplier field decides
            value = multiplier(usd, base_token_usd())
            if value > _MAX_MULTIPLIER:
                self.add_error(usd_name, _("This price is too large."))
            elif stored_name in self.changed_data and cleaned.get(stored_name) != value:
                self.add_error(
                    usd_name,
                    _(
                        "This price and its multiplier (under Advanced) disagree: "
                        "%(usd)s USD is a multiplier of %(m)s. Change one of them."
                    )
                    % {"usd": usd, "m": value},
                )
            else:
                cleaned[stored_name] = value
        return cleaned

    def clean_model(self) -> str:
        model = self.cleaned_data["model"].strip()
        patterned = any(ch in model for ch in "*?[")
        if patterned:
            validate_model_pattern(model)
        elif not is_valid_model_name(model):
            raise forms.ValidationError(
                _("A model name is 1-128 letters, digits and ._:/@+- (or an fnmatch pattern).")
            )
        return model

    def clean_encoding(self) -> str:
        encoding = self.cleaned_data.get("encoding", "").strip()
        if encoding:
            import tiktoken

            known = set(tiktoken.list_encoding_names())
            if encoding not in known:
                raise forms.ValidationError(
                    _("Unknown tiktoken encoding; one of: %(names)s")
                    % {"names": ", ".join(sorted(known))}
                )
        return encoding
