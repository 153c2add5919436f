"""dmd's start on the host: the daemon's imports, then its state opened and
read, in a fresh interpreter each time; checkouts compared in one run.

Not a test: it measures. For each checkout given (a git worktree of another
commit, say), alternating, --runs times: a state directory made, then timed
``import dmd.daemon`` + StateStore.open + every list the start-up reads.
Prints each checkout's median and minimum, and the ratio of the medians to
the first's.

    git worktree add /tmp/old 486da69
    .venv/bin/python bench/start.py . /tmp/old [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTUP = (
    "import sys\n"
    "import dmd.daemon\n"
    "from dmd.state import StateStore\n"
    "store = StateStore.open(sys.argv[1])\n"
    "store.list_devices(); store.list_pools(); store.list_volumes(); store.pending_intents()\n"
    "store.close()\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=Path, help="project directories")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    times: dict[Path, list[float]] = {c: [] for c in args.checkouts}
    for _ in range(args.runs):
        for checkout in args.checkouts:
            with tempfile.TemporaryDirectory() as state:
                # The first start makes the database: not what is timed.
                subprocess.run([sys.executable, "-c", STARTUP, state], cwd=checkout, check=True)
                began = time.perf_counter()
                subprocess.run([sys.executable, "-c", STARTUP, state], cwd=checkout, check=True)
                times[checkout].append(time.perf_counter() - began)
    first = statistics.median(times[args.checkouts[0]])
    for checkout, taken in times.items():
        median = statistics.median(taken)
        print(f"{checkout}: median {median * 1000:.0f} ms, min {min(taken) * 1000:.0f} ms "
              f"({median / first:.2f}x the first)")


if __name__ == "__main__":
    main()
