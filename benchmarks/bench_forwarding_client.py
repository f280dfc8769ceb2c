"""The forwarding client's own CPU: `H1ForwardingClient` (the default) against aiohttp's
`ForwardingClient` (the baseline), same run, same process, same answers.

    python benchmarks/bench_forwarding_client.py [--json FILE] [--requests N] [--rounds N]

One keep-alive connection to a small socket server in this process answering every POST with a
201 the size of a calendar event and the signature headers a primary sends; the request carries
the headers a forwarded write carries (signature, digest, key, forwarded) and a 200-byte body.
CPU per request (process time, client and server together: the server is the same for both),
`rounds` alternating rounds of `requests` each, p50 over the rounds; uvloop, as `latitude serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from latitude.forwarding import ForwardingClient
from latitude.forwarding_h1 import H1ForwardingClient

BODY = b"title=standup&when=2026-12-02T10%3A00&" + b"x" * 162
ANSWER = b'{"id": 1, "title": "standup", "when": "2026-12-02T10:00:00Z", "by": "ada"}' * 3
HEADERS = [
    (b"host", b"us-west.internal"),
    (b"content-type", b"application/x-www-form-urlencoded"),
    (b"forwarded", b'for=203.0.113.7;proto=https;host="eu.example.com"'),
    (b"idempotency-key", b"8f14e45f-ceea-4e7a-9f3c-0c4f2b9c6a11"),
    (b"content-digest", b"sha-256=:" + b"A" * 43 + b"=:"),
    (b"latitude-session-length", b"0"),
    (b"latitude-forwarded-from", b"eu-west"),
    (b"signature-input", b'sig1=("@method" "@authority" "@path" "content-digest");created=1'),
    (b"signature", b"sig1=:" + b"B" * 86 + b"==:"),
    (b"content-length", str(len(BODY)).encode()),
]


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = (
        b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n"
        b'signature-input: sig1=("@status" "content-digest");created=1\r\n'
        b"signature: sig1=:"
        + b"C" * 86
        + b"==:\r\ncontent-digest: sha-256=:"
        + b"D" * 43
        + b"=:\r\ncontent-length: "
        + str(len(ANSWER)).encode()
        + b"\r\n\r\n"
    )
    try:
        while True:
            request = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in request.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            writer.write(head + ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _round(client, n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        answer = await client.send("POST", "/events", HEADERS, BODY, timeout_s=5)
        assert answer.status == 201 and answer.body == ANSWER
    return (time.process_time() - started) / n * 1000


async def run(requests: int, rounds: int) -> dict:
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    clients = {"h1": H1ForwardingClient(url), "aiohttp": ForwardingClient(url)}
    cpu: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for client in clients.values():
            await _round(client, 200)  # warm up: the connection, the code paths
        for _ in range(rounds):
            for name, client in clients.items():
                cpu[name].append(await _round(client, requests))
        opened = {name: c.stats.opened for name, c in clients.items()}
    finally:
        for client in clients.values():
            await client.close()
        server.close()
    p50 = {name: statistics.median(v) for name, v in cpu.items()}
    return {
        "requests_per_round": requests,
        "rounds": rounds,
        "load_average": os.getloadavg()[0],
        "cpu_ms_per_request_p50": p50,
        "cpu_ms_per_request_rounds": cpu,
        "connections_opened": opened,
        "h1_over_aiohttp": p50["h1"] / p50["aiohttp"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="Also write the figures as JSON.")
    ap.add_argument("--requests", type=int, default=2000, help="Requests per round and client.")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import uvloop

    r = uvloop.run(run(args.requests, args.rounds))
    p50 = r["cpu_ms_per_request_p50"]
    print(
        f"forwarding client CPU per request (client + in-process server), load {r['load_average']:.2f}"
    )
    print(f"  aiohttp ForwardingClient (baseline)  {p50['aiohttp']:.3f} ms")
    print(
        f"  H1ForwardingClient                   {p50['h1']:.3f} ms  ({r['h1_over_aiohttp']:.2f} x)"
    )
    print(f"  connections opened: {r['connections_opened']}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
