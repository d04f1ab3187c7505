from __future__ import annotations

from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.urls import path

from resumable_stream.django import stop_response, stream_response, task_response

from ..common import KEEPALIVE, authorize, double, make_stream, streams, tracking


async def chat(request: HttpRequest, stream_id: str) -> HttpResponseBase:
    make = make_stream(request.GET.get)
    return await stream_response(
        request, streams, stream_id, make, keepalive=KEEPALIVE, authorize=authorize
    )


async def stop(request: HttpRequest, stream_id: str) -> HttpResponse:
    return await stop_response(request, streams, stream_id, authorize=authorize)


async def debug(request: HttpRequest, stream_id: str) -> JsonResponse:
    return JsonResponse(await tracking.debug(stream_id))


async def tasks(request: HttpRequest) -> HttpResponseBase:
    return await task_response(request, streams, double, wait_interval=KEEPALIVE)


urlpatterns = [
    path("chat/<str:stream_id>", chat),
    path("chat/<str:stream_id>/stop", stop),
    path("debug/<str:stream_id>", debug),
    path("tasks", tasks),
]
