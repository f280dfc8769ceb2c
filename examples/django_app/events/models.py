from django.db import models


class Event(models.Model):
    title = models.CharField(max_length=200)
    views = models.IntegerField(default=0)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "example_event"
        ordering = ["id"]
