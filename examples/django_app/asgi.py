"""`uvicorn examples.django_app.asgi:application`: Django, with the context open from the
server's startup to its shutdown (Django has no lifespan of its own)."""

import os

from django.core.asgi import get_asgi_application

from resumable_stream.asgi import with_context

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")
django_application = get_asgi_application()  # sets Django up: before importing the views

from .streams import streams  # noqa: E402

application = with_context(django_application, streams)
