#!/usr/bin/env bash
# Downloads (here, where the package index is reachable) the wheels the Mamba-2 examples need
# beyond jax and numpy, for the GPU machine's Python 3.12, into wheels/examples/ (git-ignored).
# Carry them to the device (run's carry: ["wheels"]); gpu_session.sh's `examples` stage
# installs them into a private directory when flax is not importable there (no network).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=wheels/examples
mkdir -p "$dest"
# flax.nnx's import-time dependencies (python -X importtime -c "from flax import nnx")
for p in flax==0.12.8 msgpack optax chex toolz rich pygments markdown-it-py mdurl treescope \
         pyyaml absl-py etils opt-einsum cloudpickle zstandard typing-extensions; do
  python -m pip download "$p" --no-deps --python-version 3.12 --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any -d "$dest" -q
done
du -sh "$dest"
