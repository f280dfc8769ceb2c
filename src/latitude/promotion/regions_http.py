"""Asking every region's gateway at once (`/_latitude/epoch`): the promotion commands, the
failover watcher and the epoch watcher each ask all regions, and one out of reach must cost its
timeout once, not before each region asked after it (the ones a failover is for)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

__all__ = ["json_to_all"]


def json_to_all(
    urls: dict[str, str], body: dict | None = None, *, timeout_s: float
) -> dict[str, dict | Exception]:
    """GET (or POST `body` to) every region's URL at once: the JSON answer of each, or the
    error (`urllib.error.HTTPError` for a refusal, `OSError` or `ValueError` otherwise)."""

    def one(url: str) -> dict | Exception:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            url,
            data=data,
            headers={"content-type": "application/json", "accept": "application/json"},
            method="GET" if body is None else "POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                answer = json.loads(resp.read() or b"{}")
            return answer if isinstance(answer, dict) else ValueError("not a JSON object")
        except urllib.error.HTTPError as exc:
            exc.close()  # its status is the answer; the socket it holds is not kept
            return exc
        except (OSError, ValueError) as exc:
            return exc

    if not urls:
        return {}
    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        futures = {name: pool.submit(one, url) for name, url in urls.items()}
        return {name: future.result() for name, future in futures.items()}
