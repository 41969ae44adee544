"""JWT for the app: simplejwt token views whose access tokens carry the tier's scopes
(``tokens``), and the throttle that slows password guessing on them (``throttling``)."""
