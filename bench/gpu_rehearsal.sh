#!/usr/bin/env bash
# Rehearses bench/gpu_session.sh here, on the CPU, with only what the GPU
# machine has (../.library/device/KINDS.md): this machine's python3 sees the
# packages listed below, linked from .venv, plus what $SITE carries; imgindex is
# not installed. A package left out of bench/gpu_site.py fails here, not there.
#   .venv/bin/python bench/gpu_site.py --python-version 3.11 --out /tmp/site311.tar.xz
#   SITE=/tmp/site311.tar.xz bash bench/gpu_rehearsal.sh
set -eu
SITE=${SITE:?set SITE to an archive from bench/gpu_site.py for this python3}
OUT=${OUT:-/tmp/gpu-rehearsal}
VENV_SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
HAS=/tmp/gpu-machine-site
rm -rf "$HAS" /tmp/site && mkdir -p "$HAS"
shopt -s nullglob nocaseglob
# The GPU machine's packages that imgindex uses (../.library/device/KINDS.md).
for name in torch torchgen functorch numpy PIL pillow cv2 opencv_python_headless onnxruntime \
    onnx ml_dtypes pyarrow pandas dateutil python_dateutil six prometheus_client packaging \
    sortedcontainers urllib3 requests certifi idna charset_normalizer \
    click yaml _yaml pyyaml psutil msgpack cloudpickle toolz tlz fsspec jinja2 markupsafe \
    filelock typing_extensions sympy mpmath networkx flatbuffers google protobuf \
    importlib_metadata zipp lazy_importer xxhash; do  # (dask needs these below Python 3.12 only)
    for path in "$VENV_SITE/$name" "$VENV_SITE/$name".* "$VENV_SITE/$name"-*.dist-info; do
        ln -sfn "$path" "$HAS/"
    done
done
rm -rf "$OUT"
OUT=$OUT SITE=$SITE PYTHON=python3 PYTHONPATH=$HAS DEVICE=cpu IMAGES=300 \
    AGREEMENT_IMAGES=100 BATCH_SIZES=8,16 bash bench/gpu_session.sh
