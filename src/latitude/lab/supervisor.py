"""The lab's link host: one background process that owns the WAN emulator's relays and takes
commands (add a relay, cut / heal / reset / re-time a link, shut down) over a loopback HTTP API.

Run as `python -m latitude.lab.supervisor STATE_DIR`; `LabWorld` starts and stops it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from pathlib import Path

from aiohttp import web

from latitude import atomic
from latitude.lab.links import TOKEN_HEADER, UnknownLinkError, WanEmulator
from latitude.topology import load_topology


def build_app(wan: WanEmulator, token: str, stop: asyncio.Event) -> web.Application:
    @web.middleware
    async def require_token(request: web.Request, handler):
        if not secrets.compare_digest(request.headers.get(TOKEN_HEADER, ""), token):
            return web.json_response({"error": "bad or missing lab token"}, status=403)
        try:
            return await handler(request)
        except UnknownLinkError as exc:
            return web.json_response({"error": str(exc)}, status=404)
        except (KeyError, ValueError, TypeError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)

    async def status(request: web.Request) -> web.Response:
        links = []
        for link in wan.links:
            links.append({"a": link.a, "b": link.b, **link.stats()})
        return web.json_response({"pid": os.getpid(), "links": links})

    def one_relay(spec: dict) -> int:
        return wan.relay(
            spec["a"], spec["b"], spec.get("host", "127.0.0.1"), int(spec["port"])
        ).port

    async def add_relay(request: web.Request) -> web.Response:
        body = await request.json()
        if "relays" in body:  # many in one call: `lab up` asks for all of them at once
            return web.json_response({"ports": [one_relay(spec) for spec in body["relays"]]})
        return web.json_response({"port": one_relay(body)})

    async def add_link(request: web.Request) -> web.Response:
        # Client links (a far user's place to a region) join the table at run time.
        body = await request.json()
        try:
            link = wan.link(body["a"], body["b"])
        except UnknownLinkError:
            link = wan.add_link(body["a"], body["b"], rtt_ms=float(body["rtt_ms"]))
        link.set_rtt(float(body["rtt_ms"]))
        link.set_jitter(float(body.get("jitter_ms", 0.0)))
        return web.json_response({"a": link.a, "b": link.b, **link.stats()})

    async def link_action(request: web.Request) -> web.Response:
        body = await request.json()
        link = wan.link(body["a"], body["b"])
        action = request.match_info["action"]
        if action == "cut":
            await asyncio.to_thread(link.cut)
        elif action == "heal":
            await asyncio.to_thread(link.heal)
        elif action == "reset":
            await asyncio.to_thread(link.reset)
        elif action == "set":
            if "rtt_ms" in body:
                link.set_rtt(float(body["rtt_ms"]))
            if "jitter_ms" in body:
                link.set_jitter(float(body["jitter_ms"]))
        else:
            return web.json_response({"error": f"unknown action {action!r}"}, status=404)
        return web.json_response({"a": link.a, "b": link.b, **link.stats()})

    async def shutdown(request: web.Request) -> web.Response:
        stop.set()
        return web.json_response({"stopping": True})

    app = web.Application(middlewares=[require_token])
    app.router.add_get("/status", status)
    app.router.add_post("/relays", add_relay)
    app.router.add_post("/links", add_link)
    app.router.add_post("/links/{action}", link_action)
    app.router.add_post("/shutdown", shutdown)
    return app


async def run(state_dir: Path) -> None:
    topology = load_topology(state_dir / "topology.toml")
    wan = WanEmulator()
    for a, b in topology.region_pairs():
        spec = topology.link(a, b)
        wan.add_link(a, b, rtt_ms=spec.rtt_ms, jitter_ms=spec.jitter_ms)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    token = secrets.token_urlsafe(24)
    runner = web.AppRunner(build_app(wan, token, stop), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    info = state_dir / "supervisor.json"
    atomic.write_json(info, {"pid": os.getpid(), "port": port, "token": token}, mode=0o600)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await asyncio.to_thread(wan.close)
        info.unlink(missing_ok=True)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m latitude.lab.supervisor STATE_DIR")
    asyncio.run(run(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
