import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchpeer.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path, re_path  # noqa: E402

from benchpeer.consumers import ChatConsumer, EchoConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_app,
        "websocket": URLRouter(
            [
                path("ws/echo/", EchoConsumer.as_asgi()),
                re_path(r"^ws/chat/(?P<room>[A-Za-z0-9_.-]{1,90})/$", ChatConsumer.as_asgi()),
            ]
        ),
    }
)
