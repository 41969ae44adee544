"""simplejwt token views whose access tokens carry the tier's scopes."""
