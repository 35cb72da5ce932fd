#!/usr/bin/env bash
# Everything dvprobe checks on a GPU, as one device call (under 10 minutes; each step has
# its own limit below):
#   here:   bash scripts/gpu_wheels.sh
#   device: run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=600)
# 1. tests/test_cuda.py: CUDA rows = the CPU's (order, fp32 values), bf16 / fp16 close to
#    fp32, loader processes keep order, a resumed run = one run, --compile rows = the
#    uncompiled ones, the engine's cuDNN flags (TF32 off for fp32, restored), hooks on the
#    device;
# 2. bench/bench_extract_cuda.py: the CUDA engine's ceiling and extract end to end from .gz
#    shards (fp32, bf16), then both again with torch.compile (ExtractConfig(compile=True);
#    compiling takes minutes, so on fewer examples).
# 3. (separately: `bash scripts/gpu_session.sh launch`) extraction on k GPUs with the local
#    launcher (--gpus all) against one GPU, rows compared.
# A dry run on a CPU machine: PY=.venv/bin/python DVPROBE_TEST_DEVICE=cpu bash scripts/gpu_session.sh
# (the tests run with the CPU standing in; the benches say there is no GPU).
# Each step has its own time limit, so a hang costs that step only. Logs land in $OUT
# (or ./gpu-session-out when run by hand).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-session-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}  # the image's python (holds torch); PY=.venv/bin/python for a dry run here
if ! "$PY" -c "import google_crc32c, zlib_ng" 2>/dev/null; then  # the carried wheels
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dvprobe-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/dvprobe-site:$PWD
else
  export PYTHONPATH=$PWD
fi
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.is_available())"
  nproc; } 2>&1 | tee "$OUT/summary.txt"
if [ "${1:-}" = launch ]; then
  # k GPUs (issue 21): one extraction as one process on cuda:0, then as one task per GPU
  # (dvprobe extract --gpus all); target >= 0.9*k x one GPU. Its own device call:
  #   run(command="bash scripts/gpu_session.sh launch", carry=[".whl"], timeout_s=600)
  step bench_launch_gpus 540 "$PY" bench/bench_launch.py --gpus all --n 16384 --shards 16 \
    --batch-size 256 --rounds 1
  cat "$OUT/summary.txt"
  exit 0
fi
step test_cuda 240 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py
step bench_cuda 150 "$PY" bench/bench_extract_cuda.py --n 8192 --batch-size 256 --workers 8
step bench_cuda_compile 180 "$PY" bench/bench_extract_cuda.py --n 2048 --batch-size 256 \
  --workers 8 --compile
cat "$OUT/summary.txt"
