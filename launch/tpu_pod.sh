#!/usr/bin/env bash
# SemPPL on a Cloud TPU VM pod slice: create the slice, install, run on every worker.
#
#   PROJECT=my-proj ZONE=us-central2-b TPU=semppl-v4-64 TYPE=v4-64 \
#   BUCKET=gs://my-bucket bash launch/tpu_pod.sh resnet50,1pct
#
# Every worker runs the same command; jax.distributed.initialize() discovers the
# slice by itself on TPU VMs (--distributed). The workdir (checkpoints, metrics)
# and TFDS data live on the bucket; rerunning the same command resumes.
set -euo pipefail
PRESET="${1:-resnet50,1pct}"
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${TPU:?set TPU (the slice name)}" "${BUCKET:?set BUCKET (gs://...)}"
TYPE="${TYPE:-v4-64}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
REPO_URL="${REPO_URL:-$(git config --get remote.origin.url)}"
WORKDIR="${WORKDIR:-$BUCKET/semppl/${PRESET/,/_}}"
DATA_DIR="${DATA_DIR:-$BUCKET/tensorflow_datasets}"

if ! gcloud compute tpus tpu-vm describe "$TPU" --zone "$ZONE" --project "$PROJECT" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" --project "$PROJECT" \
    --accelerator-type "$TYPE" --version "$VERSION"
fi

# Install on all workers (TPU jaxlib instead of the CPU pin), then run on all workers.
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --project "$PROJECT" --worker=all --command "
  set -e
  [ -d semppl_jax ] || git clone $REPO_URL semppl_jax
  cd semppl_jax && git pull --ff-only
  python3 -m pip install -q -r requirements.txt && python3 -m pip install -q 'jax[tpu]==0.10.2' && python3 -m pip install -q --no-deps -e .
"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --project "$PROJECT" --worker=all --command "
  cd semppl_jax && python3 -m semppl_jax.main --distributed \
    --config=experiments/imagenet.py:$PRESET --workdir=$WORKDIR \
    --config.dataset.data_dir=$DATA_DIR 2>&1 | tee -a ~/semppl_${PRESET/,/_}.log
"
