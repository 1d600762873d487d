#!/usr/bin/env bash
# One machine, all its accelerators (or host CPU devices): a single process.
#
#   bash launch/local.sh experiments/imagenet.py:resnet50,1pct /data/runs/r50 --config.dataset.data_dir=/data/tfds
#   bash launch/local.sh experiments/tiny.py /tmp/tiny
set -euo pipefail
CONFIG="${1:?config, e.g. experiments/imagenet.py:resnet50,1pct}"
WORKDIR="${2:?workdir}"
shift 2
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && source .venv/bin/activate
exec python -m semppl_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
