"""A tiny Django project: the Django Channels 4 peer of canal's benchmark (issue 6)."""

import os

SECRET_KEY = "canal-bench-peer-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["daphne", "channels"]
MIDDLEWARE = []
ROOT_URLCONF = "benchpeer.urls"
ASGI_APPLICATION = "benchpeer.asgi.application"
DATABASES = {}
USE_TZ = True

# CHANNELS_LAYER=redis (with CHANNELS_REDIS_URL) selects channels_redis; the default is the
# in-memory layer with its shipped capacity (100) and expiry.
if os.environ.get("CHANNELS_LAYER") == "redis":
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [os.environ.get("CHANNELS_REDIS_URL", "redis://127.0.0.1:6379")]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Logging comparable to canal's default: daphne's access log (one line per HTTP request and per
# WebSocket connect/disconnect, enabled with `--access-log`) and warnings from everything else.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
