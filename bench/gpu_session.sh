#!/usr/bin/env bash
# One lent GPU session, prepared to fit its 15 minutes: the full bench on the GPU, peak device
# memory on the two largest cases, and the core tests on the GPU in float64. Run from the repo
# root on the device machine; results land under $OUT (default bench/runs/gpu-session).
# jhvp itself may travel as a wheel in .whl/ (for its version metadata): pip wheel --no-deps -w .whl .
set -u
OUT=${OUT:-bench/runs/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3
log() { echo "== $* ($(date -u +%T))"; }
{
  log machine
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  if compgen -G ".whl/jhvp-*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/jhvp-*.whl && export PYTHONPATH=/tmp/site
  fi
  $PY -c "import sys, jax, torch; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices(), 'torch', torch.__version__, torch.cuda.get_device_name())"

  log "bench, full suite on the GPU"
  timeout 330 $PY -m bench --device gpu --rounds 5 --seconds 0.5 --out "$OUT/full"

  log "bench, peak device memory"
  timeout 100 $PY -m bench --device gpu --cases rosenbrock-5e7 mlp-42M --rounds 2 --seconds 0.1 \
    --methods jhvp_fwd_rev jhvp_operator compat_hvp torch_hvp torch_vhp --memory --out "$OUT/memory"

  log "tests on the GPU, float64"
  JAX_PLATFORMS=cuda JAX_ENABLE_X64=1 XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 \
    $PY -m pytest -q -x -p no:cacheprovider tests/test_hvp.py tests/test_operator.py tests/test_transforms.py
  log done
} 2>&1 | tee "$OUT/log.txt"
