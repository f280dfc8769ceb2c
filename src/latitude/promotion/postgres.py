"""What promotion asks of a Postgres server, over SQL: where its WAL is, promote it, point it at
another upstream, fence it read-only, quorum commit. Every call is bounded by a timeout."""

from __future__ import annotations

import time

import psycopg
from psycopg import sql


class PgUnavailable(Exception):
    """The server cannot be reached (or did not answer in time)."""


def parse_lsn(text: str | None) -> int | None:
    if not text:
        return None
    high, _, low = str(text).partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def slot_name(region: str) -> str:
    return region.replace("-", "_")


class PgServer:
    def __init__(self, name: str, url: str, timeout_s: float = 5.0):
        self.name = name
        self.url = url
        self.timeout_s = timeout_s

    def _connect(self) -> psycopg.Connection:
        try:
            conn = psycopg.connect(
                self.url, connect_timeout=max(1, int(self.timeout_s)), autocommit=True
            )
        except psycopg.Error as exc:
            raise PgUnavailable(f"{self.name}: database unreachable ({_first(exc)})") from None
        conn.execute(f"set statement_timeout = {int(self.timeout_s * 1000)}")
        return conn

    def query(self, text: str, params=None) -> list[tuple]:
        try:
            with self._connect() as c:
                cur = c.execute(text, params)
                return cur.fetchall() if cur.description else []
        except PgUnavailable:
            raise
        except psycopg.Error as exc:
            raise PgUnavailable(f"{self.name}: {_first(exc)}") from None

    def reachable(self) -> bool:
        try:
            self.query("select 1")
            return True
        except PgUnavailable:
            return False

    def in_recovery(self) -> bool:
        return bool(self.query("select pg_is_in_recovery()")[0][0])

    def position(self) -> dict:
        """Where this server's WAL is: written (a primary) or received and replayed (a standby)."""
        rows = self.query(
            "select pg_is_in_recovery(),"
            " case when pg_is_in_recovery() then null else pg_current_wal_flush_lsn()::text end,"
            " pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text,"
            " case when pg_is_in_recovery() then null"
            " else pg_walfile_name(pg_current_wal_lsn()) end,"
            " (select status from pg_stat_wal_receiver),"
            " (select received_tli from pg_stat_wal_receiver),"
            " current_setting('default_transaction_read_only')"
        )
        r = rows[0]
        return {
            "standby": r[0],
            "flush": parse_lsn(r[1]),
            "received": parse_lsn(r[2]),
            "replayed": parse_lsn(r[3]),
            "timeline": int(r[4][:8], 16) if r[4] else r[6],
            "receiver": r[5],
            "read_only": r[7] == "on",
        }

    def replay_lsn(self) -> int:
        return parse_lsn(self.query("select pg_last_wal_replay_lsn()::text")[0][0]) or 0

    def wait_replayed(self, lsn: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.replay_lsn() >= lsn:
                    return True
            except PgUnavailable:
                pass
            time.sleep(0.02)
        return False

    def wait_quiet(self, timeout_s: float = 1.0, quiet_s: float = 0.05) -> bool:
        """Wait (bounded) until no client session is inside a transaction for `quiet_s`: with
        new writes held by the gateways, the writes already running finish and are
        acknowledged, instead of failing when the server is fenced and being retried after
        the promotion. One connection, polled every 10 ms."""
        deadline = time.monotonic() + timeout_s
        try:
            with self._connect() as c:
                quiet_since = None
                while time.monotonic() < deadline:
                    busy = c.execute(
                        "select count(*) from pg_stat_activity where backend_type = 'client backend'"
                        " and xact_start is not null and pid <> pg_backend_pid()"
                    ).fetchone()[0]
                    now = time.monotonic()
                    if busy:
                        quiet_since = None
                    elif quiet_since is None:
                        quiet_since = now
                    elif now - quiet_since >= quiet_s:
                        return True
                    time.sleep(0.01)
        except (PgUnavailable, psycopg.Error):
            pass
        return False

    def promote(self, timeout_s: float = 30) -> None:
        rows = self.query("select pg_promote(true, %s)", (int(timeout_s),))
        if not rows or not rows[0][0]:
            raise PgUnavailable(f"{self.name}: pg_promote did not finish within {timeout_s:.0f} s")

    def ensure_slots(self, regions) -> None:
        existing = {r[0] for r in self.query("select slot_name from pg_replication_slots")}
        for region in regions:
            name = slot_name(region)
            if name in existing:
                # A slot left from an older timeline may hold a stale position: start it afresh.
                self.query(
                    "select pg_drop_replication_slot(%s) from pg_replication_slots"
                    " where slot_name = %s and not active",
                    (name, name),
                )
                if self.query("select 1 from pg_replication_slots where slot_name = %s", (name,)):
                    continue
            self.query("select pg_create_physical_replication_slot(%s, true)", (name,))

    def set_upstream(self, conninfo: str, slot: str | None) -> None:
        """Stream from another server from now on (reloadable since Postgres 13)."""
        self._alter("primary_conninfo", conninfo)
        self._alter("primary_slot_name", slot or "")
        self.query("select pg_reload_conf()")

    def set_synchronous(self, k: int, standbys) -> None:
        value = f"ANY {k} ({', '.join(_quote_name(s) for s in standbys)})" if k else ""
        self._alter("synchronous_standby_names", value)
        self.query("select pg_reload_conf()")

    def fence_read_only(self) -> int:
        """Refuse writes from now on: new transactions read-only, every client session ended.
        Returns the final flushed WAL position."""
        self.wait_quiet()
        self._alter("default_transaction_read_only", "on")
        self.query("select pg_reload_conf()")
        self.query(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where backend_type = 'client backend' and pid <> pg_backend_pid()"
        )
        self.query("checkpoint")
        return parse_lsn(self.query("select pg_current_wal_flush_lsn()::text")[0][0]) or 0

    def unfence(self) -> None:
        self.query("alter system reset default_transaction_read_only")
        self.query("select pg_reload_conf()")

    def _alter(self, name: str, value: str) -> None:
        self.query(sql.SQL("alter system set {} = {}").format(sql.Identifier(name), value))


def _quote_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
