#!/usr/bin/env bash
# SemPPL on a Cloud TPU VM pod slice: create the slice, install, run on every worker,
# and keep going until the run finishes.
#
#   PROJECT=my-proj ZONE=us-central2-b TPU=semppl-v4-64 TYPE=v4-64 \
#   BUCKET=gs://my-bucket bash launch/tpu_pod.sh resnet50,1pct
#
# Every worker runs the same command; jax.distributed.initialize() discovers the
# slice by itself on TPU VMs (--distributed). The workdir (checkpoints, metrics, the
# data index) and TFDS data live on the bucket. A run stopped by a preemption notice
# saves at an agreed step and exits with 75: the command is run again and resumes. A
# slice that was preempted as a whole (spot/preemptible VMs) is deleted, created
# again, set up, and the run resumes from the bucket.
# Extra arguments go to the launcher, e.g. --config.training.batch_size=2048.
set -euo pipefail
PRESET="${1:-resnet50,1pct}"
shift $(( $# < 1 ? $# : 1 ))
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${TPU:?set TPU (the slice name)}" "${BUCKET:?set BUCKET (gs://...)}"
TYPE="${TYPE:-v4-64}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
REPO_URL="${REPO_URL:-$(git config --get remote.origin.url)}"
WORKDIR="${WORKDIR:-$BUCKET/semppl/${PRESET/,/_}}"
DATA_DIR="${DATA_DIR:-$BUCKET/tensorflow_datasets}"
CONFIG="${CONFIG:-experiments/imagenet.py:$PRESET}"
MAX_RESTARTS="${MAX_RESTARTS:-100}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
JAX_VERSION="$(sed -n 's/^jax==//p' "$HERE/requirements.txt")"  # the TPU jaxlib matches the pin
EXTRA="$*"
TPU_ARGS=(--zone "$ZONE" --project "$PROJECT")

state() {  # READY, PREEMPTED, ... or NONE
  gcloud compute tpus tpu-vm describe "$TPU" "${TPU_ARGS[@]}" --format='value(state)' 2>/dev/null || echo NONE
}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU" "${TPU_ARGS[@]}" --worker=all --command "$1"
}

INSTALLED=0
setup_slice() {  # a slice that is READY and set up (once, and again after it is created anew)
  case "$(state)" in
    READY) ;;
    NONE) gcloud compute tpus tpu-vm create "$TPU" "${TPU_ARGS[@]}" --accelerator-type "$TYPE" --version "$VERSION"
          INSTALLED=0 ;;
    *) gcloud compute tpus tpu-vm delete "$TPU" "${TPU_ARGS[@]}" --quiet
       gcloud compute tpus tpu-vm create "$TPU" "${TPU_ARGS[@]}" --accelerator-type "$TYPE" --version "$VERSION"
       INSTALLED=0 ;;
  esac
  if [ "$INSTALLED" -eq 0 ]; then
    on_all_workers "
      set -e
      [ -d semppl_jax ] || git clone $REPO_URL semppl_jax
      cd semppl_jax && git pull --ff-only
      python3 -m pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION' && python3 -m pip install -q --no-deps -e .
    "
    INSTALLED=1
  fi
}

# Each worker writes its exit status; worker 0's is the run's (every process exits alike).
RUN="rm -f ~/semppl_status; cd semppl_jax && python3 -m semppl_jax.main --distributed \
  --config=$CONFIG --workdir=$WORKDIR --config.dataset.data_dir=$DATA_DIR $EXTRA \
  2>&1 | tee -a ~/semppl_${PRESET/,/_}.log; status=\${PIPESTATUS[0]}; echo \$status > ~/semppl_status; exit \$status"

for attempt in $(seq 0 "$MAX_RESTARTS"); do
  setup_slice
  status=0
  on_all_workers "$RUN" || status=$?
  if [ "$status" -ne 0 ]; then  # the run's own status, if worker 0 is still there to say it
    status="$(gcloud compute tpus tpu-vm ssh "$TPU" "${TPU_ARGS[@]}" --worker=0 --command 'cat ~/semppl_status' \
              2>/dev/null || echo "$status")"
  fi
  if [ "$status" -eq 0 ]; then
    echo "[tpu_pod] finished: $WORKDIR"
    exit 0
  elif [ "$status" -eq 75 ]; then
    echo "[tpu_pod] preempted after saving (attempt $attempt); running again"
  elif [ "$(state)" != READY ]; then
    echo "[tpu_pod] the slice is $(state) (attempt $attempt); recreating it and resuming"
  else
    echo "[tpu_pod] the run failed with status $status; not retrying" >&2
    exit "$status"
  fi
done
echo "[tpu_pod] gave up after $MAX_RESTARTS restarts" >&2
exit 1
