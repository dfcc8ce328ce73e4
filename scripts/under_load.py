"""Run a command while CPU-bound processes keep every core busy, as on a shared or loaded
machine: a test whose outcome depends on timing (timeouts, sleeps, races) shows itself
here. Prints the command's wall time and exits with its exit code.

    python scripts/under_load.py -- make test              # one hog per core
    python scripts/under_load.py --hogs 4 -- make test
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time


def _spin() -> None:  # pragma: no cover - a busy loop, killed from outside
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hogs", type=int, default=os.cpu_count() or 2,
                    help="CPU-bound processes to run beside the command (default: one per core)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command after --")
    hogs = [mp.Process(target=_spin, daemon=True) for _ in range(args.hogs)]
    for h in hogs:
        h.start()
    start = time.time()
    try:
        code = subprocess.call(command)
    finally:
        for h in hogs:
            h.terminate()
        for h in hogs:
            h.join()
    print(f"under_load: {' '.join(command)} exited {code} after {time.time() - start:.0f} s "
          f"with {args.hogs} CPU-bound processes beside it", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
