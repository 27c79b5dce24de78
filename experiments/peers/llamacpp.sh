#!/usr/bin/env bash
# The real llama.cpp server (the engine Ollama runs) as a peer of servesim.
#
#   llamacpp.sh setup                   build llama-server + llama-quantize into $LLAMACPP_DIR
#                                       and a converter venv there (idempotent)
#   llamacpp.sh serve MODEL.gguf [PORT] start llama-server on 127.0.0.1 (foreground)
#   llamacpp.sh wait [PORT] [SECS]      block until GET /health answers 200 (exit 1 on timeout)
#
# Environment: LLAMACPP_DIR (default /work/peers/llamacpp), LLAMACPP_PORT (8002),
# LLAMACPP_NP (4 slots), LLAMACPP_CTX (8192 = 2048 per slot), LLAMACPP_THREADS (1).
# No binary package is reachable from here, so the source comes from the PyPI sdist of
# llama-cpp-python, which vendors llama.cpp (0.3.36 vendors llama.cpp commit 0c1e570).
# Layout: $LLAMACPP_DIR/src -> the vendored llama.cpp tree (convert_hf_to_gguf.py, gguf-py),
#         $LLAMACPP_DIR/build/bin/{llama-server,llama-quantize}, $LLAMACPP_DIR/convert-venv.
set -euo pipefail
DIR=${LLAMACPP_DIR:-/work/peers/llamacpp}
PORT=${LLAMACPP_PORT:-8002}
VER=0.3.36

setup() {
  local t0=$SECONDS
  mkdir -p "$DIR"; cd "$DIR"
  if [ ! -d src ]; then
    pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VER" -d .
    tar xzf "llama_cpp_python-$VER.tar.gz"
    ln -sfn "llama_cpp_python-$VER/vendor/llama.cpp" src
  fi
  if [ ! -x build/bin/llama-server ] || [ ! -x build/bin/llama-quantize ]; then
    # Static, CPU-native build of just the server and the quantizer. The web UI is off
    # and so is fetching its prebuilt assets (no network but registries); OpenSSL off
    # (we only serve plain HTTP on loopback).
    # -S is the real path: through the `src` symlink, CMake's dependency on the sdist's
    # git index is written as a path that does not exist and ninja reconfigures forever.
    cmake -S "$(readlink -f src)" -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
      -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
    cmake --build build -j "$(nproc)" --target llama-server llama-quantize
  fi
  if [ ! -x convert-venv/bin/python ]; then
    # convert_hf_to_gguf.py imports torch, transformers, numpy, sentencepiece; it puts the
    # vendored gguf-py on sys.path itself. torch resolves to the machine's local CPU wheel.
    python3 -m venv convert-venv
    convert-venv/bin/pip install -q torch==2.13.0 numpy sentencepiece transformers \
      safetensors protobuf pyyaml tqdm requests
  fi
  build/bin/llama-server --version 2>&1 | head -2
  echo "llama.cpp setup took $((SECONDS - t0)) s"
}

serve() {
  local model=${1:?usage: llamacpp.sh serve MODEL.gguf [PORT]}; PORT=${2:-$PORT}
  exec "$DIR/build/bin/llama-server" -m "$model" \
    --host 127.0.0.1 --port "$PORT" \
    -np "${LLAMACPP_NP:-4}" \
    -c "${LLAMACPP_CTX:-8192}" \
    -b 2048 -ub 512 \
    -t "${LLAMACPP_THREADS:-1}" \
    --metrics \
    --no-ui \
    --alias servesim
  # -np: parallel slots (Ollama's OLLAMA_NUM_PARALLEL): at most this many sequences decode together.
  # -c: total KV context; each slot gets c/np tokens (no unified KV cache asked for).
  # -b: logical batch (most prompt tokens submitted per llama_decode call).
  # -ub: physical micro-batch the compute graph is built for.
  # -t: CPU threads for generation (and for prompt processing, as -tb defaults to -t). 1, as
  #   vLLM's CPU worker computes on one core: with 2 threads on this 2-core machine any other busy
  #   process stalls ggml's thread barrier (smoke at 4 clients: 52 out tok/s with -t 2, 116 with -t 1).
  # --metrics: Prometheus /metrics (llamacpp: counters). --no-ui: API only, no web UI.
}

wait_ready() {
  local port=${1:-$PORT} secs=${2:-300} t0=$SECONDS
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
    (( SECONDS - t0 >= secs )) && { echo "llama-server on :$port not ready after ${secs}s" >&2; return 1; }
    sleep 1
  done
  echo "llama-server on :$port ready after $((SECONDS - t0)) s"
}

case "${1:-}" in
  setup) setup ;;
  serve) shift; serve "$@" ;;
  wait) shift; wait_ready "$@" ;;
  *) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
