#!/usr/bin/env bash
# bench/gpu.sh: the GPU run of optcc's 2:4 sparse kernels (tests + benchmark) in one call.
#
#   bench/gpu.sh prepare   CPU machine, from a checkout with the dev venv (.venv): fills .gpu/
#                          with cp312 wheels of what the GPU machine lacks, a prebuilt
#                          liboptcc_kernels.so and the 2:4 MiniLM. Minutes (the kernel build).
#   bench/gpu.sh dry-run   CPU machine: checks everything that can be checked without a GPU.
#   bench/gpu.sh run       GPU machine (Python 3.12, torch with CUDA, nvcc): installs .gpu/whl
#                          into /tmp/site, loads the carried library (rebuilds it there if it
#                          does not load), runs the gpu-marked tests and bench/kernels.py, and
#                          writes $OUT/{run.log,env.txt,tests.log,tests.xml,kernels.json,kernels.md}.
#                          About 5-7 minutes; every step has its own time limit.
#
# The GPU machine of this project is reached through the device tool; the call is
#   run(command="bash bench/gpu.sh run", carry=[".gpu"], timeout_s=540)
# .gpu/ is git-ignored (so it travels only when carried) and must stay under ~55 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
GPU_DIR=$REPO/.gpu

# Python packages optcc needs that the GPU machine's image lacks (its list: onnx, onnxruntime,
# numpy, pluggy, pyyaml, rich, matplotlib, torch, pytest are there), pinned to the versions
# the CPU suite runs with; nvidia-cutlass only for rebuilding the library there.
WHEELS=(onnx_graphsurgeon==0.6.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5 typing_extensions==4.16.0 nvidia-cutlass==4.2.0.0)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)

prepare() {
  local py=${PYTHON:-$REPO/.venv/bin/python}
  mkdir -p "$GPU_DIR"
  echo "== wheels (cp312, manylinux x86_64) -> .gpu/whl"
  rm -rf "$GPU_DIR/whl"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$GPU_DIR/whl" "${WHEELS[@]}"
  echo "== liboptcc_kernels.so (sm90a + sm80; several minutes on 2 cores)"
  local lib
  lib=$(flock /tmp/optcc-cpu.lock "$py" kernels/build.py)
  cp "$lib" "$GPU_DIR/liboptcc_kernels.so"
  cp "$(dirname "$lib")/build.json" "$GPU_DIR/kernels-build.json"
  echo "== the real all-MiniLM-L6-v2, 2:4 (needs: pip install torch==2.13.0 -e '.[bench]')"
  flock /tmp/optcc-cpu.lock "$py" bench/gpu_models.py "$GPU_DIR"
  du -sh "$GPU_DIR"
}

dry_run() {
  local py=${PYTHON:-$REPO/.venv/bin/python}
  bash -n "$0" && echo "ok: shell syntax"
  "$py" kernels/build.py --dry-run | grep -c '^    sm' | sed 's/^/ok: kernels in the build plan: /'
  "$py" bench/kernels.py --dry-run
  "$py" -m pytest -q --collect-only -m gpu tests/test_kernels.py tests/test_cuda_e2e.py \
    -p no:cacheprovider | tail -1
  if [ -d "$GPU_DIR" ]; then
    for w in "${WHEELS[@]}"; do
      ls "$GPU_DIR"/whl/"$(echo "${w%%==*}" | tr - _)"-* >/dev/null 2>&1 \
        || ls "$GPU_DIR"/whl/"${w%%==*}"-* >/dev/null 2>&1 || { echo "missing wheel: $w"; exit 1; }
    done
    echo "ok: ${#WHEELS[@]} wheels"
    OPTCC_KERNELS_LIBRARY=$GPU_DIR/liboptcc_kernels.so "$py" -c \
      "from optcc.kernels import load; i = load().build_info; print('ok: carried library loads,', len(i['kernels']), 'kernels, targets', i['targets'])"
    test -f "$GPU_DIR/minilm_2to4.onnx.xz" && echo "ok: MiniLM prepared" || echo "note: no MiniLM (its test and benchmark row will be skipped)"
    local size
    size=$(du -sm "$GPU_DIR" | cut -f1)
    [ "$size" -lt 56 ] && echo "ok: .gpu is $size MiB" || { echo ".gpu is $size MiB: over the transfer limit"; exit 1; }
  else
    echo "note: .gpu/ not prepared (bench/gpu.sh prepare)"
  fi
}

run() {
  OUT=${OUT:-$REPO/gpu-out}
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/run.log") 2>&1
  local started=$SECONDS
  echo "== environment"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/env.txt"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$GPU_DIR"/whl/*.whl
  export PYTHONPATH=$REPO:$REPO/plugins:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export OPTCC_CACHE_DIR=/tmp/optcc-cache OPTCC_KERNELS_DIR=$REPO/kernels PYTHONUNBUFFERED=1
  # the kernel tests must not skip for want of a library here: they build it if need be
  export OPTCC_TEST_BUILD_KERNELS=1
  export OPTCC_KERNELS_LIBRARY=$GPU_DIR/liboptcc_kernels.so
  python3 -c "import torch, onnxruntime; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'onnxruntime', onnxruntime.__version__)" | tee -a "$OUT/env.txt"
  if ! timeout 60 python3 -c "from optcc.kernels import load; print(load().build_info['targets'])"; then
    echo "== the carried library does not load here: rebuilding it (nvcc $(nvcc --version | tail -1))"
    unset OPTCC_KERNELS_LIBRARY
    timeout 400 python3 kernels/build.py -j "$(nproc)"
  fi
  python3 -c "from bench.gpu_models import unpack_minilm; print('minilm:', unpack_minilm(__import__('pathlib').Path('$GPU_DIR')))"
  echo "== gpu tests ($((SECONDS - started)) s)"
  set +e
  timeout 240 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_cuda_e2e.py \
    -p no:cacheprovider --junitxml="$OUT/tests.xml" -o addopts="-ra" 2>&1 | tee "$OUT/tests.log"
  local tests_rc=${PIPESTATUS[0]}
  echo "== benchmark ($((SECONDS - started)) s)"
  timeout 180 python3 bench/kernels.py --out "$OUT" --models "$GPU_DIR" --budget-s 120
  local bench_rc=$?
  set -e
  echo "== done in $((SECONDS - started)) s: tests exit $tests_rc, benchmark exit $bench_rc"
  [ -f "$OUT/kernels.md" ] && cat "$OUT/kernels.md"
  tail -3 "$OUT/tests.log"
  return $((tests_rc != 0 || bench_rc != 0))
}

case "${1:-}" in
  prepare) prepare ;;
  dry-run) dry_run ;;
  run) run ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
