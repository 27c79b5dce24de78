#!/usr/bin/env bash
# The simulator against a real engine on this machine: profile it as a black box, then run its
# held-out cells twice, each time on a freshly started server, into experiments/results/peers/ENGINE.
#
#   run_validation.sh ENGINE [RUNS]        ENGINE: vllm | llamacpp_np4 | llamacpp_np1   (RUNS: 2)
#   PEER_CONFIG_SET=prefix run_validation.sh ENGINE [RUNS]
#                                          the shared-prefix cells (ENGINE_prefix.toml) into run<k>-prefix,
#                                          with the profile already there
#
# Per run k: start the server (boost.sh: its own scheduling group at nice $PEER_NICE; llama-server
# pinned to core 0, where vLLM pins its worker itself), wait until ready, [run 1: servesim profile
# --url into ENGINE/profile.csv], servesim validate ENGINE's configs --url into ENGINE/run<k>
# (run 2 reuses run 1's capacity, so its Poisson cells have the same rates), stop the server.
# Each phase's wall time and the load average around it go to ENGINE/setup.tsv; the client runs
# boosted on core 1. Nothing is left running. Environment: PEER_CHECKPOINT (the export folder,
# default /work/peers/ckpt-small-100m-s0), PEER_LOGS (server logs, default /work/peers/logs),
# PEER_PYTHON (the project's python, default /work/venv/bin/python), PEER_RESULTS (default
# experiments/results/peers), PEER_GRID (profile grid, default "default"), and those of vllm.sh,
# llamacpp.sh and boost.sh.
set -euo pipefail
ENGINE=${1:?usage: run_validation.sh vllm|llamacpp_np4|llamacpp_np1 [RUNS]}
RUNS=${2:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CKPT=${PEER_CHECKPOINT:-/work/peers/ckpt-small-100m-s0}
LOGS=${PEER_LOGS:-/work/peers/logs}
PY=${PEER_PYTHON:-/work/venv/bin/python}
OUT=${PEER_RESULTS:-$REPO/experiments/results/peers}/$ENGINE
GRID=${PEER_GRID:-default}
SET=${PEER_CONFIG_SET:-main}
mkdir -p "$OUT" "$LOGS"

case "$ENGINE" in
  vllm) PORT=${VLLM_PORT:-8001}; CONFIGS=(vllm_closed vllm_poisson vllm_mix); READY_S=900
        start() { "$HERE/boost.sh" --pidfile "$LOGS/$ENGINE.pid" "$HERE/vllm.sh" serve "$CKPT/hf" "$PORT"; } ;;
  llamacpp_np4|llamacpp_np1)
        NP=${ENGINE#llamacpp_np}; PORT=${LLAMACPP_PORT:-8002}; READY_S=120
        CONFIGS=("${ENGINE}_closed" "${ENGINE}_poisson" "${ENGINE}_mix")
        start() { LLAMACPP_NP=$NP LLAMACPP_CTX=$((2048 * NP)) "$HERE/boost.sh" --pidfile "$LOGS/$ENGINE.pid" --cpus 0 \
                    "$HERE/llamacpp.sh" serve "$CKPT/gguf/model-f16.gguf" "$PORT"; } ;;
  *) echo "unknown engine $ENGINE (vllm | llamacpp_np4 | llamacpp_np1)" >&2; exit 2 ;;
esac
wait_ready() { if [ "$ENGINE" = vllm ]; then "$HERE/vllm.sh" wait "$PORT" "$READY_S"; else "$HERE/llamacpp.sh" wait "$PORT" "$READY_S"; fi; }
servesim() { PYTHONPATH=$REPO "$HERE/boost.sh" --cpus 1 "$PY" -c "from sim.lab.cli import main; main()" "$@"; }
load() { cut -d' ' -f1-3 /proc/loadavg; }
[ -f "$OUT/setup.tsv" ] || printf 'run\tphase\tseconds\tload_before\tload_after\n' > "$OUT/setup.tsv"
phase() {  # phase RUN NAME CMD...: run CMD, log its wall time and the load around it
  local run=$1 name=$2 t0=$SECONDS before; shift 2; before=$(load)
  "$@"
  printf '%s\t%s\t%s\t%s\t%s\n' "$run" "$name" "$((SECONDS - t0))" "$before" "$(load)" >> "$OUT/setup.tsv"
}
stop() {
  local pid; pid=$(cat "$LOGS/$ENGINE.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"; for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$LOGS/$ENGINE.pid"
}
trap stop EXIT

SUFFIX=
if [ "$SET" = prefix ]; then
  CONFIGS=("${ENGINE}_prefix"); SUFFIX=-prefix
  [ -f "$OUT/profile.csv" ] || { echo "PEER_CONFIG_SET=prefix needs $OUT/profile.csv (run the main set first)" >&2; exit 2; }
elif [ "$SET" != main ]; then
  echo "unknown PEER_CONFIG_SET=$SET (main | prefix)" >&2; exit 2
fi
cfgs=(); for c in "${CONFIGS[@]}"; do cfgs+=("$HERE/$c.toml"); done
for run in $(seq 1 "$RUNS"); do
  echo "== $ENGINE run $run$SUFFIX: starting the server (load $(load))"
  t0=$SECONDS; before=$(load)
  start > "$LOGS/$ENGINE-run$run.log" 2>&1 &
  sleep 1
  wait_ready
  printf '%s\t%s\t%s\t%s\t%s\n' "$run$SUFFIX" "server start to ready" "$((SECONDS - t0))" "$before" "$(load)" >> "$OUT/setup.tsv"
  if [ ! -f "$OUT/profile.csv" ]; then
    phase "$run" "servesim profile --url ($GRID grid)" \
      servesim profile --url "http://127.0.0.1:$PORT/v1" --model small-100m --grid "$GRID" --out "$OUT/profile.csv"
  fi
  capacity=()
  if [ "$SET" = main ] && [ "$run" -gt 1 ] && [ -f "$OUT/run1/cells.json" ]; then
    capacity=(--capacity "$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['capacity_req_s'])" "$OUT/run1/cells.json")")
  fi
  rm -rf "$OUT/run$run$SUFFIX"
  phase "$run$SUFFIX" "servesim validate --url (${CONFIGS[*]})" \
    servesim validate "${cfgs[@]}" --url "http://127.0.0.1:$PORT/v1" --profile "$OUT/profile.csv" \
      --out "$OUT/run$run$SUFFIX" --capacity-fractions "${capacity[@]}"
  stop
done
echo "results: $OUT"
