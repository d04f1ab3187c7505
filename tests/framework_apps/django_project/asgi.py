import os

from django.core.asgi import get_asgi_application

from resumable_stream.asgi import with_context

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.framework_apps.django_project.settings")
django_application = get_asgi_application()

from ..common import streams  # noqa: E402

application = with_context(django_application, streams)
