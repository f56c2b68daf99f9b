"""Wall time of `steersample compare` with its default settings (target: <= 60 s on 2 CPU cores).

    python benchmarks/compare_time.py [--runs N] [--threads T]

Runs the command in a fresh process each time (so imports and model loading count) and prints
a table of wall times plus the per-run sampling seconds from report.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="OMP/torch threads (default: torch's)")
    args = p.parse_args()
    env = None
    if args.threads is not None:
        import os

        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print("| run | wall s | plain sampling s | steered sampling s | command total s |")
    print("|---|---|---|---|---|")
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "steersample.cli", "compare", "--no-progress",
                            "--out", tmp], check=True, stdout=subprocess.DEVNULL, env=env)
            wall = time.perf_counter() - start
            rep = json.loads((Path(tmp) / "report.json").read_text())
        res = rep["results"]
        print(f"| {i} | {wall:.1f} | {res['plain']['seconds']:.2f} | {res['steered']['seconds']:.2f} "
              f"| {rep['seconds_total']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
