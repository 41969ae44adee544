from django.urls import include, path

from tests.system.scale_site import views

urlpatterns = [
    path("policy/<int:pk>/", views.policy),
    path("call/<int:pk>/", views.call),
    path("acall/<int:pk>/", views.acall),
    path("heartbeat/", views.beat),
    path("", include("llm_quota.urls")),  # the gateway, as the demo project mounts it
]
