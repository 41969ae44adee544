"""DRF adapters: throttle, scope permission, authentication, errors and headers."""
