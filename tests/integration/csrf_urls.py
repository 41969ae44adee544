"""Plain views gated by ``@quota_gated`` as the README writes them (no ``csrf_exempt``),
and one as the README used to (``@csrf_exempt`` on top)."""

from django.http import JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from llm_quota.decorators import quota_gated
from tests.integration.pipeline_urls import USAGE


@quota_gated
def gated(request):
    return JsonResponse({"usage": USAGE})


@quota_gated
async def agated(request):
    return JsonResponse({"usage": USAGE})


@csrf_exempt
@quota_gated
def exempted(request):
    return JsonResponse({"usage": USAGE})


urlpatterns = [path("gated", gated), path("agated", agated), path("exempted", exempted)]
