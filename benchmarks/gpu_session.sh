#!/usr/bin/env bash
# Everything a GPU session has to prove, in one device call (see ../shared/GPU.md): build, the GPU tests,
# compute-sanitizer on small cases, then the benchmark beside the peers. Writes logs and results under
# gpu-out/ and, where the device tool gives an $OUT folder (it returns at most 8 files), packs them into
# $OUT/gpu-session.tgz. Carry .peers (../shared/tools/fetch_peers.sh) for cuEquivariance and
# OpenEquivariance. Stages can be skipped: STAGES="build tests sanitizer tune bench" (default all).
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine, from the repository root
#
# A device command may run 10 minutes: split the stages over calls, e.g. STAGES="build tests sanitizer",
# then STAGES="build bench" (the build is incremental on a warm machine). results.json is rewritten after
# every case, so a bench cut off by the limit keeps what it measured.
set -uo pipefail
DEST=${OUT:-}
OUT=gpu-out
STAGES=${STAGES:-"build tests sanitizer tune bench"}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export EQUIKERN_CACHE_DIR=${EQUIKERN_CACHE_DIR:-$PWD/.equikern-cache}
if [ -f .peers/peers_env.sh ]; then
  # shellcheck disable=SC1091
  source .peers/peers_env.sh
  export PYTHONPATH=${PYTHONPATH:-}:$PWD/.peers/extra
fi
has() { [[ " $STAGES " == *" $1 "* ]]; }
status=0

if has build; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
  python3 -m pip install -q --no-build-isolation --no-deps --no-index . 2>&1 | tail -20 | tee "$OUT/build.log"
  python3 -c "import torch, triton, equikern; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT/device.txt" || exit 1
fi

if has tests; then
  # the GPU tests first (marked cuda), then the interpreter-free Triton tests on the GPU
  python3 -m pytest -q -m cuda tests 2>&1 | tail -60 | tee "$OUT/gpu-tests.log" || status=1
fi

if has sanitizer; then
  # out-of-bounds checks of the Triton and CUDA kernels on small cases
  compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q -x -m cuda \
    tests/test_triton_tensor_product.py tests/test_triton_tensor_product_conv.py \
    -k "cuda_matches_cpu_native and float32 or lattice and float32" 2>&1 | tail -30 | tee "$OUT/memcheck.log" \
    || status=1
fi

if has tune; then
  # launch configurations of the Triton kernels (tile size, warps) for the six problems
  python3 -m equikern.triton.tune --json "$OUT/tune.json" 2>&1 | tail -20 | tee "$OUT/tune.log" || status=1
fi

if has bench; then
  python3 -m equikern.bench --device cuda --dtype float32 --problems tensor_product,conv --min-time 0.2 \
    --out "$OUT/bench-fp32" 2>&1 | tail -80 \
    | tee "$OUT/bench-fp32.log" || status=1
  python3 -m equikern.bench --device cuda --dtype float64 --modes fwd,fwdbwd --problems tensor_product \
    --out "$OUT/bench-fp64" 2>&1 | tail -40 | tee "$OUT/bench-fp64.log" || status=1
fi
if [ -n "$DEST" ]; then
  tar -czf "$DEST/gpu-session.tgz" -C "$OUT" .
  cp "$OUT"/*.log "$DEST/" 2>/dev/null
fi
exit $status
