#!/usr/bin/env bash
# Checks the CUDA path on a machine with an NVIDIA GPU, torch with CUDA and
# imgindex importable (PYTHONPATH or installed): a LocalCluster build with
# --device cuda, then real `dask scheduler` + one GPU worker (--resources GPU=1)
# + one CPU-only worker, `imgindex doctor`, and a --gpu-resource build.
# Prints JSON summaries; exits non-zero on the first failed check.
set -euo pipefail
PY=${PYTHON:-python3}
W=${WORKDIR:-$(mktemp -d)}
imgindex() { "$PY" -m imgindex "$@"; }

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
"$PY" -m imgindex.pipeline.synthetic "$W/photos" 400 --max-side 800

echo "== LocalCluster, --device cuda vs --device cpu"
export DASK_IMGINDEX__LOCAL__N_WORKERS=2
imgindex build "$W/photos" --out "$W/cuda" --device cuda --json > "$W/cuda.json"
imgindex build "$W/photos" --out "$W/cpu" --device cpu --json > "$W/cpu.json"
"$PY" - "$W" <<'PYEOF'
import json, sys
import numpy as np
from imgindex.pipeline.store import read_index_dir
w = sys.argv[1]
for kind in ("cuda", "cpu"):
    d = json.load(open(f"{w}/{kind}.json"))["datasets"][0]
    print(kind, {k: d[k] for k in ("indexed", "embedded", "seconds", "images_per_second")})
a, b = read_index_dir(f"{w}/cuda/photos"), read_index_dir(f"{w}/cpu/photos")
ids = np.array([r.id for r in a.manifest])
cos = (a.index.reconstruct_batch(ids) * b.index.reconstruct_batch(ids)).sum(1)
print("cuda vs cpu embeddings: lowest cosine", float(cos.min()))
# The GPU decodes with nvJPEG (--decoder batch), the CPU with Pillow: tests/
# test_batch_decode.py holds the two within cosine 0.995.
assert a.index.ntotal == b.index.ntotal == 400 and cos.min() > 0.995
PYEOF

echo "== dask scheduler + GPU worker + CPU-only worker"
unset DASK_IMGINDEX__LOCAL__N_WORKERS
"$PY" -m distributed.cli.dask_scheduler --scheduler-file "$W/s.json" --host 127.0.0.1 \
    --port 0 --dashboard-address :0 > "$W/scheduler.log" 2>&1 &
sleep 5
"$PY" -m distributed.cli.dask_worker --scheduler-file "$W/s.json" --nthreads 1 \
    --resources GPU=1 --name gpu > "$W/gpu-worker.log" 2>&1 &
CUDA_VISIBLE_DEVICES="" "$PY" -m distributed.cli.dask_worker --scheduler-file "$W/s.json" \
    --nthreads 1 --name cpu > "$W/cpu-worker.log" 2>&1 &
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
sleep 10
imgindex doctor --scheduler-file "$W/s.json" --json > "$W/doctor.json"
"$PY" -c "
import json; r = json.load(open('$W/doctor.json'))
print('doctor ok:', r['ok'], [(w['resources'], w.get('device'), w.get('embed_seconds')) for w in r['workers']])
assert r['ok'] and sorted(w['device'] for w in r['workers']) == ['cpu', 'cuda']"
imgindex build "$W/photos" --out "$W/routed" --scheduler-file "$W/s.json" \
    --gpu-resource --json > "$W/routed.json"
"$PY" -c "
import json; d = json.load(open('$W/routed.json'))['datasets'][0]
print('--gpu-resource workers:', d['workers'])
assert len(d['workers']) == 1 and d['indexed'] == 400"
echo "all GPU checks passed"
