from django.urls import path

from tests.scale_site import views

urlpatterns = [
    path("policy/<int:pk>/", views.policy),
    path("call/<int:pk>/", views.call),
    path("acall/<int:pk>/", views.acall),
    path("heartbeat/", views.beat),
]
