from django.urls import path

from . import views

urlpatterns = [
    path("chat/<str:stream_id>", views.chat),
    path("chat/<str:stream_id>/stop", views.stop),
]
