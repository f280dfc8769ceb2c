"""Which failed connection attempts are refusals (the database is down for good) and which
only say nothing yet (a timeout)."""

from __future__ import annotations

import pytest

from latitude.primary_pool import RefusalWatch, is_refusal


@pytest.mark.parametrize(
    "message",
    [
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
        "Connection refused\n\tIs the server running on that host and accepting TCP/IP?",
        "connection failed: server closed the connection unexpectedly",
        "consuming input failed: Connection reset by peer",
        'connection to server on socket "/run/pg/.s.PGSQL.5432" failed: No such file or directory',
    ],
)
def test_refusals(message):
    assert is_refusal(Exception(message))


@pytest.mark.parametrize(
    "message",
    [
        "connection timeout expired",
        'connection to server at "10.0.0.1", port 5432 failed: timeout expired',
        'FATAL:  password authentication failed for user "app"',
        "",
    ],
)
def test_not_refusals(message):
    assert not is_refusal(Exception(message))


async def test_the_latest_attempt_decides():
    watch = RefusalWatch()
    assert not watch.refusing()
    watch._report(Exception("Connection refused"))
    assert watch.refusing() and watch.error == "Connection refused"
    await watch.wait_refused()  # already refused: returns at once
    watch._report(Exception("timeout expired"))  # says nothing either way
    assert watch.refusing()
    watch._report(None)  # a connection was made
    assert not watch.refusing() and watch.error == ""
