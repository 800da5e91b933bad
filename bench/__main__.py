"""`python -m bench [--quick]`: run every benchmark module in turn, each in its own process.

A module is listed here by name and must accept `--quick`. Each runs in a fresh interpreter so that one module's
allocations, threads and warm caches do not colour another's figures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

MODULES = [
    "bench.weighted_ntp",
    "bench.critical_dpo",
    "bench.unlearning",
    "bench.concept_heads",
    "bench.aligndistil",
    "bench.scaling",
    "bench.scoring",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short version of every benchmark (about a minute each)")
    args = parser.parse_args(argv)
    failed = []
    for module in MODULES:
        print(f"# running {module}{' --quick' if args.quick else ''}", flush=True)
        rc = subprocess.call([sys.executable, "-m", module, *(["--quick"] if args.quick else [])])
        if rc != 0:
            failed.append(module)
    if failed:
        print(f"# failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
