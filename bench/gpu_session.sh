#!/usr/bin/env bash
# One session on the GPU machine for issue 29, as ../shared/GPU-TESTING.md
# describes it: unpack the carried packages (.whl/site.tar.xz, see below), then
# the batch decoder's agreement with the CPU path and its speed
# (bench/decode_agreement.py), the throughput bench against the DataLoader and
# nvJPEG loops (bench/gpu_throughput.py) and the CUDA checks
# (bench/gpu_check.sh), each under its own timeout, everything written to $OUT.
#
# What the machine lacks, packed to fit a call's 64 MiB (git ignores .whl/):
#   .venv/bin/python bench/gpu_site.py          # .whl/site.tar.xz, ~31 MiB
# and then, from the session:
#   run(command="OUT=$OUT bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
# $OUT/report.md then holds the figures as docs/guide/gpus.md takes them.
# Rehearse it here first, on the CPU, with only what the GPU machine has:
#   .venv/bin/python bench/gpu_site.py --python-version 3.11 --out /tmp/site311.tar.xz
#   SITE=/tmp/site311.tar.xz bash bench/gpu_rehearsal.sh
set -u
OUT=${OUT:?set OUT to the folder the results go to}
IMAGES=${IMAGES:-10000}
DEVICE=${DEVICE:-cuda}
AGREEMENT_IMAGES=${AGREEMENT_IMAGES:-2000}
BATCH_SIZES=${BATCH_SIZES:-64,128,256,512}
SITE=${SITE:-.whl/site.tar.xz}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # the commands below run elsewhere
if [ -e "$SITE" ]; then
    "$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall("/tmp/site", filter="data")' \
        "$SITE" || exit 1
fi
# setup.cfg maps pipeline/, cluster/ and service/ into the imgindex package when
# it is installed; uninstalled, the same layout is made of links.
rm -rf /tmp/src && mkdir -p /tmp/src/imgindex
ln -s "$PWD"/imgindex/* /tmp/src/imgindex/
for d in pipeline cluster service; do ln -s "$PWD/$d" "/tmp/src/imgindex/$d"; done
export PYTHONPATH=/tmp/site:/tmp/src${PYTHONPATH:+:$PYTHONPATH}
# `python -m` puts the working folder first on sys.path, and in the checkout
# that is imgindex/ without its subpackages: every command runs from the links.
REPO=$PWD
cd /tmp/src
export PYTHONUNBUFFERED=1
# A call runs 600 s at most: each step stops in time for the results to come back.
END=${END:-585}
step() {  # step NAME SECONDS COMMAND...: its output in $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local started=$SECONDS
    [ $((END - SECONDS)) -lt "$limit" ] && limit=$((END - SECONDS))
    [ "$limit" -lt 30 ] && { echo "== $name: skipped, $limit s left"; return; }
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s"
    tail -n 25 "$OUT/$name.log"
}
{ nvidia-smi || true; nproc; "$PYTHON" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)'; } \
    > "$OUT/machine.txt" 2>&1
head -n 20 "$OUT/machine.txt"
step decode_agreement 150 "$PYTHON" "$REPO/bench/decode_agreement.py" --device "$DEVICE" \
    --images "$AGREEMENT_IMAGES" --report "$OUT/decode_agreement.json"
step gpu_throughput 420 "$PYTHON" "$REPO/bench/gpu_throughput.py" --device "$DEVICE" \
    --images "$IMAGES" --batch-sizes "$BATCH_SIZES" --report "$OUT/gpu_throughput.json"
if [ "$DEVICE" = cuda ]; then
    PYTHON=$PYTHON step gpu_check 180 bash "$REPO/bench/gpu_check.sh"
fi
# The figures as docs/guide/gpus.md takes them (from whatever finished).
"$PYTHON" "$REPO/bench/gpu_report.py" "$OUT" > "$OUT/report.md" && cat "$OUT/report.md"
