"""The lab commands of docs/routing.md, run as written (issue 10, item 8): `dig` gets the
nearest healthy region from `latitude dns`, and the next one when a region's service dies.

The block runs in the test run's shared lab (so its first line, `latitude lab up`, is already
done) and on free ports instead of 5353 and 8053, which something else on a shared machine may
hold. Each `dig` line's comment is the answer it must print.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from latitude.lab.harness import free_port

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

DOCS = Path(__file__).parent.parent / "docs" / "routing.md"


def lab_block() -> str:
    text = DOCS.read_text()
    section = text[text.index("## In the lab\n") :]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    assert m, "docs/routing.md: no sh block under '## In the lab'"
    return m.group(1)


def test_the_documented_lab_commands_answer_dig_with_the_nearest_healthy_region(world, tmp_path):
    if shutil.which("dig") is None:
        pytest.skip("dig is not installed (Debian package dnsutils): the docs were not run")
    block = lab_block()
    lines = block.splitlines()
    assert lines[0] == "latitude lab up" and world.is_running()
    expected = [
        line.split("#", 1)[1].strip() for line in lines if line.startswith("dig ") and "#" in line
    ]
    assert len(expected) >= 6 and len(set(expected)) == 3, expected
    dns_port, http_port = free_port(), free_port()
    script = "\n".join(lines[1:]).replace("5353", str(dns_port)).replace("8053", str(http_port))
    env = {
        **os.environ,
        "LATITUDE_LAB_DIR": str(world.state_dir),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "COLUMNS": "200",
    }
    env.pop("LATITUDE_LAB_KEY", None)  # the docs never set it: nothing may need it
    env.pop("LATITUDE_TOPOLOGY", None)
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # `latitude dns &`, if the script stopped early
        for region in world.state().regions:
            world.kill(region, "mirror")
            if region != world.state().primary:
                world.kill(region, "mirror-sync")
    assert proc.returncode == 0, out + err
    assert "Traceback" not in err and "LATITUDE_LAB_KEY" not in err, err
    answers = [line for line in out.splitlines() if re.fullmatch(r"[\d.]+", line.strip())]
    assert answers == expected, f"dig answered {answers}, the docs say {expected}\n{out}\n{err}"
