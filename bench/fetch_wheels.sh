#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach PyPI (the device tool's image: Python 3.12, torch 2.11, no open_clip,
# no DeepSpeed), into .whl/ (git-ignored), from a machine that can:
#
#     bash bench/fetch_wheels.sh               # open_clip 3.3.0 + ftfy + wcwidth (~2.4 MB): what gpu_suite.sh uses
#     bash bench/fetch_wheels.sh --deepspeed   # + DeepSpeed 0.19.8 and what the image lacks of its needs (7.1 MB in all)
#
# gpu_suite.sh installs whatever is in .whl/ with
#     pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# (device tool: carry=[".whl"]). One version of each package: a second copy stops the whole install.
#
# The image already holds regex, timm, huggingface-hub, safetensors, tqdm, torchvision (open_clip's needs) and
# einops, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo (DeepSpeed's). DeepSpeed is an sdist only: it is
# built here into a pure-Python wheel with DS_BUILD_OPS=0 (its CUDA ops compile just in time where they run,
# with the image's nvcc and ninja). pydantic-core is binary: fetched for cp312 manylinux x86-64.
# Versions of the pure-Python DeepSpeed needs follow this machine's venv where it has them (the tested set).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"
PY=${PYTHON:-python3}
BIN=$(dirname "$(command -v "${VENV_PYTHON:-.venv/bin/python}" 2>/dev/null || echo .venv/bin/python)")
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
bin312() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLAT[@]}" -d "$DEST" "$@"; }
pure() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$DEST" "$@"; }
venv_version() {  # the version this repo's venv holds, else the fallback
    local v
    v=$("$BIN/pip" show "$1" 2>/dev/null | awk '/^Version:/{print $2}') || true
    echo "${v:-$2}"
}

bin312 wcwidth==0.9.4
pure open_clip_torch==3.3.0 ftfy==6.3.1

if [ "${1:-}" = "--deepspeed" ]; then
    bin312 "pydantic-core==$(venv_version pydantic_core 2.50.5)"
    pure "pydantic==$(venv_version pydantic 2.14.4)" "annotated-types==$(venv_version annotated-types 0.8.0)" \
        "typing-inspection==$(venv_version typing-inspection 0.4.5)" "hjson==$(venv_version hjson 3.1.0)"
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" deepspeed==0.19.8
    # --no-build-isolation: DeepSpeed's setup.py imports torch, which the venv has (a build env would fetch GBs)
    DS_BUILD_OPS=0 "$BIN/pip" wheel -q --no-deps --no-build-isolation -w "$DEST" "$tmp"/deepspeed-0.19.8.tar.gz
    rm -rf "$tmp"
fi
ls -l "$DEST"
du -sh "$DEST"
