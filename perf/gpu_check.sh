#!/usr/bin/env bash
# One prepared GPU run: throughput table with the Pyro/plain ratio, time per
# epoch of the norman_like-shaped training, bf16 vs fp32. Writes CSVs and a log to $OUT.
#   on a CUDA machine:  bash perf/gpu_check.sh   (installs pinned wheels from .whl/ if present)
#   on a CPU, end to end with tiny sizes:  OUT=/tmp/gc DEVICE=cpu TINY=1 bash perf/gpu_check.sh
set -u -o pipefail
OUT=${OUT:-/tmp/gpu_check_out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ "${SKIP_WHEELS:-0}" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
LOG=$OUT/gpu_check.log
{
  date; nvidia-smi -L 2>/dev/null || true
  $PY -c "import torch, pyro, anndata, numpy, pandas; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'pyro', pyro.__version__, 'anndata', anndata.__version__, 'numpy', numpy.__version__, 'pandas', pandas.__version__)" || exit 1
} 2>&1 | tee "$LOG"
if [ "${TINY:-0}" = 1 ]; then
  A=(--sizes 1000x200:64); A2=(--sizes 1000x200:128); E=(--cells 1500 --genes 200 --batches 128 --epochs 1); C=(--cells 1500 --genes 200 --batch 128 --steps 15)
  V=pyro_svi,pyro_jit,pyro_module,plain,plain_bf16,data; W=(--warmup 1 --steps 2)
else
  A=(--sizes 100000x5000:512,1024,4096 10000x2000:64,512 100000x10000:1024); A2=(--sizes 100000x5000:1024)
  E=(--cells 60000 --genes 5000 --batches 512,4096 --epochs 2); C=(--cells 60000 --genes 5000 --batch 1024 --steps 200)
  V=pyro_svi,pyro_module,plain,plain_dedupe,pyro_module_bf16,plain_bf16,data; W=(--warmup 8 --steps 25)
fi
# quick overrides (a tight device budget): A_SIZES="100000x5000:512,1024" VARIANTS=... E_EPOCHS=1 C_STEPS=100 SKIP_JIT=1
[ -n "${A_SIZES:-}" ] && A=(--sizes $A_SIZES)
[ -n "${VARIANTS:-}" ] && V=$VARIANTS
[ -n "${E_RUNS:-}" ] && E=(--cells 60000 --genes 5000 --batches $E_RUNS --epochs ${E_EPOCHS:-1})
[ -n "${C_STEPS:-}" ] && C=(--cells 60000 --genes 5000 --batch 1024 --steps $C_STEPS)
step() { echo; echo "=== $1 ($(date +%T))"; }
{
  step "(a) throughput, Pyro/plain ratio"
  timeout ${T_A:-110} $PY perf/throughput.py --device $DEVICE "${A[@]}" --variants $V "${W[@]}" --max-seconds ${MAXS:-95} --out $OUT/throughput.csv
  step "(a2) JitTraceMeanField_ELBO at one size"
  [ "${SKIP_JIT:-0}" = 1 ] || timeout ${T_A2:-35} $PY perf/throughput.py --device $DEVICE "${A2[@]}" --variants pyro_jit,pyro_svi,plain "${W[@]}" --out $OUT/throughput_jit.csv
  step "(b) norman_like-shaped training: time per epoch, peak GPU memory"
  timeout ${T_B:-60} $PY perf/epoch_time.py --device $DEVICE "${E[@]}" --out $OUT/epoch_time.csv
  step "(c) bf16 vs fp32"
  timeout ${T_C:-40} $PY perf/bf16_check.py --device $DEVICE "${C[@]}" --out $OUT/bf16_check.csv
  step "done"
} 2>&1 | grep -v -E "Warning|warnings.warn|^  warn" | tee -a "$LOG"
