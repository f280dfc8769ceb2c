"""A stand-in for an app in another language (think PHP) behind `latitude gateway`.

It knows nothing of Latitude but two headers: `Latitude-Database` (which database to use) and
`X-Forwarded-For`. Its sessions are opaque strings in the region's Valkey under PHP's key
(`PHPREDIS_SESSION:<id>`, cookie `PHPSESSID`), exactly where PHP's redis handler keeps them.

Run: python tests/sidecar_upstream.py PORT   (with LATITUDE_TOPOLOGY and LATITUDE_REGION set)
"""

from __future__ import annotations

import os
import secrets
import sys

import psycopg
import redis.asyncio as redis
from aiohttp import web

from latitude.topology import load_topology


def build() -> web.Application:
    topology = load_topology(os.environ["LATITUDE_TOPOLOGY"])
    region = topology.region(os.environ["LATITUDE_REGION"])
    store = redis.from_url(region.session_store_url)
    databases = {
        "replica": region.database_url,
        "primary": region.primary_database_url or region.database_url,
    }

    def sid_of(request: web.Request) -> str | None:
        return request.cookies.get("PHPSESSID")

    async def login(request: web.Request) -> web.Response:
        sid = secrets.token_hex(16)
        name = (await request.post()).get("name", "nobody")
        await store.set(f"PHPREDIS_SESSION:{sid}", f'user|s:{len(name)}:"{name}";'.encode())
        response = web.json_response({"ok": True, "region": region.name})
        response.set_cookie("PHPSESSID", sid, path="/", httponly=True)
        return response

    async def add_note(request: web.Request) -> web.Response:
        sid = sid_of(request)
        session = await store.get(f"PHPREDIS_SESSION:{sid}") if sid else None
        if not session:
            return web.json_response({"error": "no session"}, status=401)
        text = (await request.post()).get("text", "")
        async with await psycopg.AsyncConnection.connect(
            databases[request.headers["Latitude-Database"]]
        ) as db:
            await db.execute("create table if not exists sidecar_notes (text text, ip text)")
            await db.execute(
                "insert into sidecar_notes values (%s, %s)",
                (text, request.headers.get("X-Forwarded-For")),
            )
            await db.commit()
        await store.set(f"PHPREDIS_SESSION:{sid}", session + b'flash|s:5:"saved";')
        return web.json_response({"ok": True, "region": region.name}, status=201)

    async def whoami(request: web.Request) -> web.Response:
        sid = sid_of(request)
        session = await store.get(f"PHPREDIS_SESSION:{sid}") if sid else None
        return web.json_response(
            {
                "region": region.name,
                "session": session.decode() if session else None,
                "client": request.headers.get("X-Forwarded-For"),
                "database": request.headers.get("Latitude-Database"),
            }
        )

    app = web.Application()
    app.router.add_post("/login", login)
    app.router.add_post("/notes", add_note)
    app.router.add_get("/whoami", whoami)
    return app


if __name__ == "__main__":
    web.run_app(build(), host="127.0.0.1", port=int(sys.argv[1]), print=None)
