#!/usr/bin/env bash
# Judge every recorded run again with the current simulator, no server needed: for each
# experiments/results/peers/ENGINE/run*/ (main and -prefix sets), `servesim validate --sim-only` with
# the configs that run measured (the keys of its cells.json), ENGINE/profile.csv and the run's own
# recorded capacity. Rewrites each run's sim/, errors.csv, error_summary.csv, server_checks.csv and
# fidelity.png (saved with a 64-colour palette: ~40 kB instead of ~200 kB, so the committed results stay
# small); the measurements (bench/) are read only. Then rewrite the paper with write_paper.py.
#
#   rejudge.sh [ENGINE...]        ENGINE: vllm | llamacpp_np4 | llamacpp_np1   (default: all three)
#
# Environment: PEER_PYTHON (the project's python, default /work/venv/bin/python), PEER_RESULTS
# (default experiments/results/peers).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PY=${PEER_PYTHON:-/work/venv/bin/python}
RESULTS=${PEER_RESULTS:-$REPO/experiments/results/peers}
[ $# -gt 0 ] || set -- vllm llamacpp_np4 llamacpp_np1
cd "$REPO"
for engine in "$@"; do
  for run in "$RESULTS/$engine"/run*/; do
    run=${run%/}
    [ -f "$run/cells.json" ] || { echo "skip $run (no cells.json)"; continue; }
    mapfile -t names < <("$PY" -c "import json,sys; print('\n'.join(json.load(open(sys.argv[1]))['cells']))" "$run/cells.json")
    cfgs=(); for n in "${names[@]}"; do cfgs+=("$HERE/$n.toml"); done
    echo "== $engine $(basename "$run"): ${names[*]}"
    PYTHONPATH=$REPO "$PY" -c "from sim.lab.cli import main; main()" validate "${cfgs[@]}" --sim-only \
      --profile "${RESULTS#"$REPO"/}/$engine/profile.csv" --out "$run" --capacity-fractions \
      | sed -n "1,6p"
  done
done
"$PY" - "$RESULTS" "$@" <<'PY'
import sys
from pathlib import Path

from PIL import Image  # matplotlib's own dependency

root = Path(sys.argv[1])
for engine in sys.argv[2:]:
    for png in sorted((root / engine).glob("run*/fidelity.png")):
        Image.open(png).convert("RGB").quantize(colors=64).save(png, optimize=True)
PY
