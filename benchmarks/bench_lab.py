"""How long `latitude lab up` takes for the default three-region world (target: under 30 s on a
2-core machine), and how long `down` takes. Baseline: the bare `initdb` + start of one Postgres,
measured in the same run, so the ratio says how many single-database start-ups a world costs.

    python benchmarks/bench_lab.py [--runs N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from latitude.lab import LabWorld
from latitude.lab.binaries import RunAs, postgres_bin_dir
from latitude.lab.ports import free_ports
from latitude.lab.postgres import PostgresNode


def one_postgres(folder: Path) -> float:
    run_as = RunAs.for_postgres()
    node = PostgresNode(
        "baseline", folder / "pg" / "data", free_ports(1)[0], postgres_bin_dir(run_as), run_as
    )
    started = time.perf_counter()
    node.init_primary(template=False)  # a real initdb: the baseline stays what it was
    node.start()
    elapsed = time.perf_counter() - started
    node.stop()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    ups, downs, baselines = [], [], []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="latitude-bench-lab-") as tmp:
            tmp_path = Path(tmp)
            import os

            os.chmod(tmp_path, 0o755)  # the lab's database user must reach it
            baselines.append(one_postgres(tmp_path / "baseline"))
            world = LabWorld(tmp_path / "lab")
            started = time.perf_counter()
            world.up()
            ups.append(time.perf_counter() - started)
            started = time.perf_counter()
            world.down()
            downs.append(time.perf_counter() - started)
        print(
            f"run {i + 1}/{args.runs}: up {ups[-1]:.2f} s, down {downs[-1]:.2f} s, one Postgres {baselines[-1]:.2f} s"
        )
    figures = {
        "lab_up_p50_s": round(statistics.median(ups), 2),
        "lab_up_max_s": round(max(ups), 2),
        "lab_down_p50_s": round(statistics.median(downs), 2),
        "one_postgres_initdb_start_p50_s": round(statistics.median(baselines), 2),
        "up_vs_one_postgres": round(statistics.median(ups) / statistics.median(baselines), 1),
        "up_vs_30s_target": round(statistics.median(ups) / 30, 2),
    }
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
