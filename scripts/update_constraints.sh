#!/usr/bin/env bash
# Move the pins in constraints-cpu.txt: install the newest releases (torch stays pinned: CPU wheel), run the
# whole suite against them, and only if it passes rewrite constraints-cpu.txt with the versions it ran with.
#
#   scripts/update_constraints.sh            # then review `git diff constraints-cpu.txt` and commit
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
torch_pin=$(grep -E '^torch==' constraints-cpu.txt)
python3 -m venv "$venv"
"$venv/bin/pip" install -q "$torch_pin"
"$venv/bin/pip" install -q -c <(echo "$torch_pin") -e '.[dev]'
HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q
# Rewrite the pins in place (same names, same order, comments kept), from what the passing venv has.
"$venv/bin/python" - <<'PY'
import re
from importlib.metadata import version
lines = open("constraints-cpu.txt").read().splitlines()
out = []
for line in lines:
    m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line)
    if m and m.group(1) != "torch":
        line = f"{m.group(1)}=={version(m.group(1))}"
    out.append(line)
open("constraints-cpu.txt", "w").write("\n".join(out) + "\n")
PY
git --no-pager diff --stat constraints-cpu.txt
