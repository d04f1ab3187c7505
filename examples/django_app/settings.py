"""The least settings Django needs to serve the views: no database, no apps, no middleware."""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "only-for-the-example")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "examples.django_app.urls"
INSTALLED_APPS: list[str] = []
# A real project keeps its middleware; with CsrfViewMiddleware the stop view needs the token.
MIDDLEWARE: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True
