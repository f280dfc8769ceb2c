"""A trivial ASGI app that tells what it was given: the raw path and query, the headers, the
client address and scheme, the body's size and hash. Behind `latitude serve` it is the
primary's app as the gateway presents it; run by plain uvicorn it is a sidecar's upstream.

- `X-Answer-Bytes: N` answers N bytes instead (a large answer);
- `X-Hold-Ms: N` holds the run N ms before anything else (a slow write at the primary);
- `X-Record: KEY` adds a row (KEY, body size, body sha256) to `edge_writes` in the database
  this request must use (the gateway's route, or the sidecar's `Latitude-Database` header).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import psycopg

from latitude.db import current_route
from latitude.topology import load_topology


def _databases() -> dict[str, str]:
    topology = load_topology(os.environ["LATITUDE_TOPOLOGY"])
    region = topology.region(os.environ["LATITUDE_REGION"])
    return {
        "replica": region.database_url,
        "primary": region.primary_database_url or region.database_url,
    }


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    digest, size = hashlib.sha256(), 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        digest.update(chunk)
        size += len(chunk)
        if not message.get("more_body"):
            break
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    route = headers.get("latitude-database") or current_route.get()
    if "x-fail" in headers:  # an app's unhandled error, before any answer
        raise RuntimeError("the edge app failed on purpose")
    if "x-hold-ms" in headers:
        await asyncio.sleep(int(headers["x-hold-ms"]) / 1000)
    if "x-record" in headers:
        async with await psycopg.AsyncConnection.connect(_databases()[route]) as db:
            await db.execute(
                "create table if not exists edge_writes (key text, size bigint, sha text)"
            )
            await db.execute(
                "insert into edge_writes values (%s, %s, %s)",
                (headers["x-record"], size, digest.hexdigest()),
            )
            await db.commit()
    if "x-answer-bytes" in headers:
        n = int(headers["x-answer-bytes"])
        body = (bytes(range(251)) * (n // 251 + 1))[:n]
        kind = b"application/octet-stream"
    else:
        body = json.dumps(
            {
                "method": scope["method"],
                "raw_path": scope["raw_path"].decode("latin-1"),
                "query_string": scope["query_string"].decode("latin-1"),
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]
                ],
                "client": (scope.get("client") or [None])[0],
                "scheme": scope.get("scheme"),
                "route": route,
                "body_bytes": size,
                "body_sha256": digest.hexdigest(),
            }
        ).encode()
        kind = b"application/json"
    await send(
        {
            "type": "http.response.start",
            "status": 201 if scope["method"] == "POST" else 200,
            "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
