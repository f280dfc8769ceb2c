"""The calendar's background job: a reminder for each new event, "sent" by writing it to a table.

Run the worker next to the app in every region; it works only while its region is primary:
`latitude worker --region us-west examples.calendar.tasks:tasks`.
"""

from __future__ import annotations

import procrastinate
import psycopg

from latitude.workers import enqueue, enqueue_in, open_queue, prepare_queue

tasks = procrastinate.Blueprint()

REMINDERS = """
create table if not exists reminders (
    id bigserial primary key, event_id int not null, title text not null,
    sent_by text not null, sent_at timestamptz not null default now())
"""


@tasks.task(name="remind", pass_context=True)
async def remind(context, event_id: int, title: str) -> None:
    extra = context.additional_context
    async with await psycopg.AsyncConnection.connect(extra["database_url"]) as db:
        await db.execute(REMINDERS)
        await db.execute(
            "insert into reminders (event_id, title, sent_by) values (%s, %s, %s)",
            (event_id, f"Reminder: {title}", extra["region"]),
        )


async def remind_later(engine, event_id: int, title: str) -> None:
    """A reminder job on its own connection to the primary database (for code outside a
    transaction; the calendar uses `remind_in`)."""
    await enqueue(engine, "remind", event_id=event_id, title=title)


async def remind_in(db, event_id: int, title: str) -> None:
    """A reminder job in the event's own transaction (it commits with the event)."""
    await enqueue_in(db, "remind", event_id=event_id, title=title)


async def warm(engine) -> None:
    """Open the queue to the primary database before the first write needs it."""
    await open_queue(engine)


async def prepare(engine) -> None:
    """At start-up in the primary region: the queue's tables exist before the first request."""
    await prepare_queue(engine)
