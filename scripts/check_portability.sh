#!/usr/bin/env bash
# The fast tier over the portability matrix: toy seeds × CPU kernel ISA.
#
#   bash scripts/check_portability.sh                 # seeds 0-4 × {native, default}
#   SEEDS="0 3" ISAS="default" bash scripts/check_portability.sh
#
# "native" runs with the machine's best ATen kernels (AVX-512, AVX2, ...); "default" sets
# ATEN_CPU_CAPABILITY=default (no vectorised ATen kernels: the same on every x86 machine). Each cell builds its
# own toy checkpoint (PROBE_TEST_TOY_SEED) the way a user's machine would. Every verdict of the suite must be the
# same in every cell: the script prints a table (seed × ISA → passed / failed / seconds), writes it as JSON to
# $OUT (default portability.json), and exits 1 if any cell failed. Uses .venv (the README's test setup).
set -uo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1 2 3 4"}
ISAS=${ISAS:-"native default"}
JOBS=${JOBS:-2}
OUT=${OUT:-portability.json}
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1
logs=$(mktemp -d)
status=0
for seed in $SEEDS; do
  for isa in $ISAS; do
    cell="seed${seed}-${isa}"
    start=$(date +%s)
    if [ "$isa" = native ]; then
      env -u ATEN_CPU_CAPABILITY PROBE_TEST_TOY_SEED="$seed" "$PY" -m pytest -q -m "not slow" -n "$JOBS" \
        -p no:cacheprovider --junitxml="$logs/$cell.xml" >"$logs/$cell.log" 2>&1
    else
      ATEN_CPU_CAPABILITY="$isa" PROBE_TEST_TOY_SEED="$seed" "$PY" -m pytest -q -m "not slow" -n "$JOBS" \
        -p no:cacheprovider --junitxml="$logs/$cell.xml" >"$logs/$cell.log" 2>&1
    fi
    rc=$?
    echo "$cell rc=$rc seconds=$(( $(date +%s) - start ))" >>"$logs/cells.txt"
    [ "$rc" -eq 0 ] || { status=1; echo "== $cell failed (rc $rc); its tail:"; tail -n 30 "$logs/$cell.log"; }
  done
done
"$PY" - "$logs" "$OUT" <<'EOF'
import json, platform, sys, xml.etree.ElementTree as ET
from pathlib import Path

import torch

logs, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for line in (logs / "cells.txt").read_text().splitlines():
    cell, rc, secs = line.split()
    seed, isa = cell.removeprefix("seed").split("-", 1)
    suite = ET.parse(logs / f"{cell}.xml").getroot() if (logs / f"{cell}.xml").exists() else None
    suite = suite.find("testsuite") if suite is not None and suite.tag == "testsuites" else suite
    get = (lambda k: int(suite.get(k, 0))) if suite is not None else (lambda k: 0)
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in (suite.iter("testcase") if suite is not None else [])
              if c.find("failure") is not None or c.find("error") is not None]
    rows.append({"seed": int(seed), "isa": isa, "rc": int(rc.split("=")[1]), "seconds": int(secs.split("=")[1]),
                 "passed": get("tests") - get("failures") - get("errors") - get("skipped"),
                 "failed": get("failures") + get("errors"), "skipped": get("skipped"), "failed_tests": failed})
machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "native_isa": torch.backends.cpu.get_cpu_capability()}
out.write_text(json.dumps({"machine": machine, "cells": rows}, indent=1) + "\n")
print(f"\nfast tier (-m 'not slow') on {machine['native_isa']} native, torch {machine['torch']}:")
print("| seed | ISA | passed | failed | skipped | seconds |\n|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['seed']} | {r['isa']} | {r['passed']} | {r['failed']} | {r['skipped']} | {r['seconds']} |")
    for t in r["failed_tests"]:
        print(f"|   | failed: {t} | | | | |")
print(f"(written to {out})")
EOF
exit $status
