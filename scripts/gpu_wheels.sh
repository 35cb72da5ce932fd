#!/usr/bin/env bash
# Stage, on this machine, the wheels a GPU device machine lacks for scripts/gpu_session.sh.
# Its image already holds torch (CUDA), numpy, pandas, pyarrow, protobuf, safetensors,
# scikit-learn, tqdm, typer, onnx, onnxruntime and pytest (/work/.library/device/KINDS.md);
# nothing can be fetched there, so the rest travels as wheels in .whl/ (ignored by git;
# name it in the device call's `carry`). Python 3.12, manylinux x86-64, as that image.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl google-crc32c==1.9.0 zlib-ng==1.1.0
ls -l .whl
