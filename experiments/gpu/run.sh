#!/usr/bin/env bash
# One-shot GPU run of the reference engine: everything a short GPU lease should measure, in one go.
#
#   experiments/gpu/run.sh [OUT_DIR]             on a GPU machine with only this repository
#   experiments/gpu/run.sh --dry-run [OUT_DIR]   the same stages on this machine's CPU, tiny shapes (CI runs it)
#   experiments/gpu/run.sh --prepare WHEEL_DIR   on a machine with a package registry: fetch the wheels a GPU
#                                                machine without one needs (pure-Python deps, CPython 3.12)
#
# Stages, each bounded by its own timeout so a slow stage cannot eat the others (about 8 minutes in all):
#   setup       project importable (wheels from experiments/gpu/wheels if present; JAX comes from the machine)
#   device      device, driver, versions, measured copy bandwidth                         experiments/gpu/device_check.py
#   kernel      Pallas paged attention vs the jnp reference on the device: max|diff| and
#               achieved K/V bandwidth per cell                                   experiments/benchmarks/paged_attention_kernel.py
#   layouts     whole-model decode step, paged vs contiguous KV, achieved GB/s      experiments/benchmarks/paged_vs_contiguous.py
#   profile     step latencies of the 8B shape on a grid sized to finish            servesim profile --grid gpu
#   validate    the engine on llama8b_gpu.toml (1, 8, 32 clients: the bench) and the simulator calibrated
#               from that profile, compared                                          servesim validate
# Everything lands in OUT_DIR (default runs/gpu-<date>): one log per stage, run.log with the stage times,
# the profile CSV, the bench and simulator results. A failed stage is logged and the next one runs; the script
# exits non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/../.."

mode=gpu
case "${1:-}" in
  --dry-run) mode=dry; shift ;;
  --prepare)
    dir=${2:?usage: run.sh --prepare WHEEL_DIR}
    # Pure-Python dependencies a GPU image (JAX, numpy, pandas, matplotlib, click, tqdm preinstalled) lacks.
    python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$dir" simpy pydantic pydantic-core annotated-types typing-inspection typing-extensions
    exit $? ;;
esac
out=${1:-runs/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
log="$out/run.log"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1

scale=1  # stage limits x scale
if [ "$mode" = dry ]; then
  # The rehearsal checks that every stage runs to its end; compiling on a 2-core CPU (shared, in CI) is
  # slower than on the GPU host, so its limits are doubled (the GPU run keeps the 8-minute budget).
  scale=2
  export JAX_PLATFORMS=cpu
  model=tiny; dtype=float32; config=experiments/gpu/tiny_dry_run.toml; grid=quick
  kernel_args=(--batches 1 --contexts 64 --block-sizes 16 --budget 0.05)
  layout_args=(--models tiny --batches 1 4 --contexts 64 --reps 3)
else
  model=llama-3.1-8b; dtype=bfloat16; config=experiments/gpu/llama8b_gpu.toml; grid=gpu
  kernel_args=()
  layout_args=(--models llama-3.1-8b --batches 1 8 32 --contexts 512 2048 --reps 10)
fi

failed=()
stage() {  # stage NAME SECONDS COMMAND...: run with a deadline, log its output, time and exit status
  local name=$1 limit=$(($2 * scale)); shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit} s): $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
  [ "$rc" = 0 ] || failed+=("$name")
}

servesim() { python3 -c "from sim.lab.cli import main; main()" "$@"; }
export -f servesim

{ echo "mode $mode, model $model ($dtype), $(date -u +%FT%TZ), host $(hostname)"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 --version; } >> "$log" 2>&1

if [ "$mode" = gpu ] && [ -d experiments/gpu/wheels ]; then
  stage setup 120 python3 -m pip install -q --no-index --no-deps --target /tmp/servesim-site experiments/gpu/wheels/*.whl
  export PYTHONPATH=/tmp/servesim-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

stage device 60 python3 experiments/gpu/device_check.py
stage kernel 90 python3 experiments/benchmarks/paged_attention_kernel.py "${kernel_args[@]}" --csv "$out/kernel.csv"
stage layouts 90 python3 experiments/benchmarks/paged_vs_contiguous.py "${layout_args[@]}"
stage profile 150 bash -c "servesim profile --model $model --dtype $dtype --grid $grid --repeats 5 --out $out/profile.csv"
if [ -f "$out/profile.csv" ]; then
  stage validate 180 bash -c "servesim validate $config --profile $out/profile.csv --out $out/validate"
else
  echo "== validate: skipped (no profile)" | tee -a "$log"
  failed+=(validate)
fi
echo "done: $out (total $SECONDS s); failed stages: ${failed[*]:-none}" | tee -a "$log"
[ ${#failed[@]} = 0 ]
