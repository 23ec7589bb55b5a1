#!/usr/bin/env bash
# Runs the same probe jobs at two commits on this machine and compares their outputs field by field.
#
#   bash scripts/compare_runs.sh OLD NEW            # e.g. main HEAD, or two commit hashes
#
# For a change that must not move any number (a restructuring): each commit is checked out into a temporary
# worktree and run with the README's environment (.venv, one thread, offline), in the worktree (its code, not the
# installed one). Jobs, each at both commits:
#   toy build   python -m probe_dist.toy build --seed 0: every file of the two builds byte-identical (the trainer
#               state's build_seconds aside);
#   toy demo    the README's first command (configs/toy_cpu.yaml) on OLD's toy build;
#   trl         a real TRL GRPOTrainer checkpoint-N (tests/helpers/train_trl.py, trained once from OLD's toy base)
#               probed from its path alone, with the length reward.
# The comparison: summary.json key by key (every number bitwise; the keys that hold wall time or memory and the
# paths of the staging directory are listed as skipped), sequences.jsonl row by row. Exits 1 on any difference.
# Not a stored fixture: stored floats are machine-bound, so both commits run here, now.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: compare_runs.sh OLD NEW}
NEW=${2:?usage: compare_runs.sh OLD NEW}
REPO=$(pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
work=$(mktemp -d)
trap 'git -C "$REPO" worktree remove --force "$work/old" 2>/dev/null || true;
      git -C "$REPO" worktree remove --force "$work/new" 2>/dev/null || true; rm -rf "$work"' EXIT
git worktree add -q --detach "$work/old" "$OLD"
git worktree add -q --detach "$work/new" "$NEW"
echo "OLD $(git -C "$work/old" rev-parse --short HEAD)  NEW $(git -C "$work/new" rev-parse --short HEAD)  work $work"

at() {  # at TREE CMD...: run in that commit's worktree with its own code first on the path
  local tree=$1; shift
  (cd "$tree" && PYTHONPATH="$tree" "$@")
}

for side in old new; do
  echo "== toy build ($side)"
  at "$work/$side" "$PY" -m probe_dist.toy build --out "$work/toy-$side" --seed 0 >"$work/toy-$side.log" 2>&1
done
echo "== TRL checkpoint-N (trained once, from OLD's toy base)"
at "$work/new" "$PY" tests/helpers/train_trl.py "$work/toy-old/base" "$work/toy-old/tokenizer" "$work/trl" \
  >"$work/trl.log" 2>&1
# Both sides write to the same output.dir (moved aside after each run): it is part of the resolved config and so of
# provenance/config_hash, which must then be equal too.
for side in old new; do
  echo "== toy demo ($side)"
  at "$work/$side" "$PY" -m probe_dist.main --config configs/toy_cpu.yaml "checkpoint.path=$work/toy-old" \
    "output.dir=$work/out" --quiet >"$work/demo-$side.log" 2>&1
  mv "$work/out" "$work/demo-$side"
  echo "== trl checkpoint-2 ($side)"
  at "$work/$side" "$PY" -m probe_dist.main "checkpoint.path=$work/trl/checkpoint-2" device=cpu \
    sampling.B_E=8 sampling.G_E=4 sampling.B_U=8 "estimators.etas=[0,1e-4,1e-3]" \
    sampling.reward=tests.helpers.rewards:reward_length "output.dir=$work/out" --quiet >"$work/trl-$side.log" 2>&1
  mv "$work/out" "$work/trl-$side"
done

"$PY" - "$work" <<'EOF'
import hashlib
import json
import sys
from pathlib import Path

work = Path(sys.argv[1])
# Keys whose values are measurements of the run itself (wall time, memory) or name its own files.
VOLATILE = ("phase_seconds", "seconds", "build_seconds", "memory/", "provenance/run_id", "provenance/output_dir",
            "provenance/started", "provenance/finished")


def volatile(key: str) -> bool:
    return any(v in key for v in VOLATILE)


def same(a, b) -> bool:
    """Bitwise for numbers (NaN equals NaN), recursively for containers."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


failures = []


def compare_dir(name: str, old: Path, new: Path) -> None:
    s_old, s_new = (json.loads((d / "summary.json").read_text()) for d in (old, new))
    skipped = sorted(k for k in s_old.keys() | s_new.keys() if volatile(k))
    keys = sorted(k for k in s_old.keys() | s_new.keys() if not volatile(k))
    bad = [k for k in keys if k not in s_old or k not in s_new or not same(s_old[k], s_new[k])]
    r_old, r_new = ([json.loads(line) for line in (d / "sequences.jsonl").read_text().splitlines()] for d in (old, new))
    rows_bad = [i for i, (a, b) in enumerate(zip(r_old, r_new)) if not same(a, b)] + (
        ["row count"] if len(r_old) != len(r_new) else [])
    numbers = sum(1 for k in keys if isinstance(s_old.get(k), int | float))
    print(f"{name}: summary {len(keys)} keys ({numbers} scalar numbers, sweep {len(s_old.get('sweep', []))} rows) "
          f"{'identical' if not bad else 'DIFFER: ' + ', '.join(bad)}; sequences {len(r_old)} rows "
          f"{'identical' if not rows_bad else 'DIFFER at ' + str(rows_bad[:5])}; skipped (timing/memory): {skipped}")
    if bad or rows_bad:
        failures.append(name)
        for k in bad[:10]:
            print(f"   {k}: old {json.dumps(s_old.get(k))[:200]}  new {json.dumps(s_new.get(k))[:200]}")


def timeless(obj):
    """`obj` without the keys that hold wall time (build_seconds, each stage's seconds)."""
    if isinstance(obj, dict):
        return {k: timeless(v) for k, v in obj.items() if "seconds" not in k}
    return [timeless(v) for v in obj] if isinstance(obj, list) else obj


def digest(path: Path) -> str:
    if path.name == "trainer_state.json":
        return hashlib.sha256(json.dumps(timeless(json.loads(path.read_text())), sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


files = {side: {p.relative_to(work / f"toy-{side}"): digest(p) for p in sorted((work / f"toy-{side}").rglob("*"))
                if p.is_file()} for side in ("old", "new")}
differ = sorted(str(k) for k in files["old"].keys() | files["new"].keys()
                if files["old"].get(k) != files["new"].get(k))
print(f"toy build: {len(files['old'])} files {'identical' if not differ else 'DIFFER: ' + ', '.join(differ)}")
if differ:
    failures.append("toy build")
compare_dir("toy demo", work / "demo-old", work / "demo-new")
compare_dir("trl checkpoint-2", work / "trl-old", work / "trl-new")
print("RESULT:", "identical" if not failures else "DIFFERENT (" + ", ".join(failures) + ")")
sys.exit(1 if failures else 0)
EOF
