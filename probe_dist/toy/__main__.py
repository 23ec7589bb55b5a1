"""python -m probe_dist.toy build --out DIR [--seed N]: build the toy checkpoint into an empty directory."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from probe_dist.toy.checkpoint import build


def main(argv=None) -> int:
    """`python -m probe_dist.toy build --out DIR [--seed N]`: build the toy checkpoint into DIR (new or empty)
    and print a JSON line of its final accuracy, token entropy and build time. Returns 0, or 2 when DIR is
    not empty (argparse raises SystemExit(2) on bad arguments)."""
    p = argparse.ArgumentParser(prog="python -m probe_dist.toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the toy checkpoint")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: --out {str(out)!r} exists and is not empty; choose a new directory.", file=sys.stderr)
        return 2
    state = build(out, a.seed)
    print(json.dumps({"out": str(out), "final_sampled_accuracy": state["final_sampled_accuracy"],
                      "final_token_entropy": state["final_token_entropy"],
                      "build_seconds": round(state["build_seconds"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
