from django.urls import path
from events import views

urlpatterns = [
    path("events/", views.events),
    path("events/<int:event_id>/touch", views.touch),
]
