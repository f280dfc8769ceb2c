"""GET /events/ lists events from the local replica; POST /events/ creates one on the primary and
answers with the primary's replication position (the gateway puts it in the client's cookie)."""

from django.db import connections, router
from django.http import HttpResponseNotAllowed, JsonResponse

from latitude.consistency import primary_position

from .models import Event


def _served_by(alias: str) -> str:
    with connections[alias].cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery()")
        return "replica" if cur.fetchone()[0] else "primary"


def events(request):
    if request.method == "GET":
        alias = router.db_for_read(Event)
        titles = list(Event.objects.values_list("title", flat=True))
        return JsonResponse({"events": titles, "database": alias, "served_by": _served_by(alias)})
    if request.method == "POST":
        event = Event.objects.create(title=request.POST["title"])
        with connections[event._state.db].cursor() as cur:
            position = primary_position(cur)
        return JsonResponse({"id": event.id, "position": str(position)}, status=201)
    return HttpResponseNotAllowed(["GET", "POST"])


def touch(request, event_id: int):
    """A GET that writes (a view counter): list it in [routes] always_forward."""
    Event.objects.filter(id=event_id).update(views=1)
    return JsonResponse({"id": event_id})
