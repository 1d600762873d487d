#!/usr/bin/env bash
# SemPPL on a Cloud TPU VM slice: a queued resource, every worker at this commit, a run that
# outlives this terminal, and restarts after preemption.
#
#   PROJECT=my-proj ZONE=us-central2-b TPU=semppl-v4-64 TYPE=v4-64 BUCKET=gs://my-bucket \
#     bash launch/tpu_pod.sh resnet50,1pct [launcher args, e.g. --config.training.batch_size=2048]
#
# What it does, each step safe to repeat:
# 1. A queued resource named $TPU (CAPACITY=on-demand|spot|reserved), its runtime chosen from
#    TYPE (v4: tpu-ubuntu2204-base, v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e:
#    v2-alpha-tpuv6e; VERSION overrides). A capacity error or a FAILED request is retried
#    with back-off; a preempted (SUSPENDED) one is deleted and asked for again.
# 2. The workers get this repository's commit (`git archive`, copied with scp: no clone,
#    no credentials, the same code on every host) and a Python 3.11 environment with the
#    pins (launch/tpu_worker.sh; the images' python3 is 3.10).
# 3. Each worker starts the preflight, then training, detached (setsid nohup): closing this
#    terminal stops nothing. Output and exit status go to $WORKDIR/logs/<attempt>/worker<i>/.
# 4. This script follows worker 0's log and every worker's status on the bucket: exit 75
#    (preempted, saved) or a lost slice starts a new attempt that resumes; 0 ends; the
#    preflight's 78 or a crash stops with the failing workers' last lines.
# Run it again at any time to reattach: a live attempt is followed, not restarted.
# Restarts keep the commit the run started with (UPDATE_CODE=1 moves it to this one).
set -euo pipefail
PRESET="${1:-resnet50,1pct}"
shift $(( $# < 1 ? $# : 1 ))
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${TPU:?set TPU (the slice name)}" "${BUCKET:?set BUCKET (gs://...)}"
TYPE="${TYPE:-v4-64}"
CAPACITY="${CAPACITY:-on-demand}"
WORKDIR="${WORKDIR:-${BUCKET%/}/semppl/${PRESET/,/_}}"
DATA_DIR="${DATA_DIR:-${BUCKET%/}/tensorflow_datasets}"
LABEL_LISTS="${LABEL_LISTS:-${BUCKET%/}/semppl/imagenet_subsets}"  # staged once, by process 0
CONFIG="${CONFIG:-experiments/imagenet.py:$PRESET}"
MAX_RESTARTS="${MAX_RESTARTS:-100}"
POLL="${POLL:-60}"            # seconds between looks at the slice and the workers' status
STALE="${STALE:-900}"         # a worker whose heartbeat is this old is gone
MAX_BACKOFF="${MAX_BACKOFF:-1800}"
EXPECT_PLATFORM="${EXPECT_PLATFORM:-tpu}"  # what the preflight expects jax to find
HERE="$(cd "$(dirname "$0")/.." && pwd)"
GCLOUD_ARGS=(--zone "$ZONE" --project "$PROJECT")
LAUNCHER_ARGS=("$@")  # expanded as ${LAUNCHER_ARGS[@]+"${LAUNCHER_ARGS[@]}"}: it may be empty

say() { echo "[tpu_pod $(date -u +%H:%M:%S)] $*"; }

runtime_for() {  # the TPU software version for an accelerator type (Cloud TPU's table)
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "TYPE=$1: unknown accelerator type; set VERSION to its TPU software version" >&2; return 1 ;;
  esac
}
VERSION="${VERSION:-$(runtime_for "$TYPE")}"
case "$CAPACITY" in
  on-demand) CAPACITY_ARGS=(--zone "$ZONE") ;;  # never empty: bash < 4.4 (macOS) calls an empty array unbound
  spot) CAPACITY_ARGS=(--zone "$ZONE" --spot) ;;
  reserved) CAPACITY_ARGS=(--zone "$ZONE" --reserved) ;;
  *) echo "CAPACITY=$CAPACITY: one of on-demand, spot, reserved" >&2; exit 2 ;;
esac

# ---------------------------------------------------------------- the workdir (a bucket or a shared path)
wd_cat() { case "$1" in gs://*) gcloud storage cat "$1" 2>/dev/null ;; *) cat "$1" 2>/dev/null ;; esac; }
wd_put() {  # stdin -> $1
  case "$1" in gs://*) gcloud storage cp - "$1" >/dev/null ;; *) mkdir -p "$(dirname "$1")" && cat > "$1" ;; esac
}
status_field() { sed -n "s/^$2 //p" <<< "$1" | head -n1; }

# ---------------------------------------------------------------- the code every worker runs
git -C "$HERE" rev-parse --git-dir >/dev/null 2>&1 || { echo "$HERE is not a git checkout" >&2; exit 2; }
HEAD_COMMIT="$(git -C "$HERE" rev-parse HEAD)"
RUN_COMMIT="$(wd_cat "$WORKDIR/logs/commit" || true)"
if [ -z "$RUN_COMMIT" ] || [ "${UPDATE_CODE:-0}" = 1 ]; then
  if [ -n "$(git -C "$HERE" status --porcelain --untracked-files=no)" ] && [ "${ALLOW_DIRTY:-0}" != 1 ]; then
    echo "uncommitted changes in $HERE would not reach the workers (they get commit ${HEAD_COMMIT:0:12});" \
         "commit them, or set ALLOW_DIRTY=1 to run the commit as it is" >&2
    exit 2
  fi
  RUN_COMMIT="$HEAD_COMMIT"
  echo "$RUN_COMMIT" | wd_put "$WORKDIR/logs/commit"
elif [ "$RUN_COMMIT" != "$HEAD_COMMIT" ]; then
  say "the run was started at ${RUN_COMMIT:0:12}; restarts keep it (this checkout is at ${HEAD_COMMIT:0:12};" \
      "UPDATE_CODE=1 moves the run to it)"
fi
git -C "$HERE" cat-file -e "$RUN_COMMIT^{commit}" || { echo "commit $RUN_COMMIT is not in $HERE" >&2; exit 2; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
ARCHIVE="$TMP/code-$RUN_COMMIT.tar.gz"
git -C "$HERE" archive --format=tar.gz -o "$ARCHIVE" "$RUN_COMMIT"
git -C "$HERE" show "$RUN_COMMIT:launch/tpu_worker.sh" > "$TMP/tpu_worker-$RUN_COMMIT.sh"

# ---------------------------------------------------------------- the slice
describe() {  # describe WHAT FORMAT: the state; NONE only when gcloud says there is none; UNKNOWN
  local out                  # when gcloud itself failed (a dropped connection, an expired token): ask again
  if out="$(gcloud compute tpus "$1" describe "$TPU" "${GCLOUD_ARGS[@]}" --format="$2" 2>&1)"; then
    echo "$out"
  elif grep -q "NOT_FOUND" <<< "$out"; then echo NONE
  else echo UNKNOWN
  fi
}
qr_state() { describe queued-resources 'value(state.state)'; }
node_state() { describe tpu-vm 'value(state)'; }
slice_gone() {  # the slice was taken back or failed: seen twice, POLL apart, so a blip is not a loss
  local look
  for look in 1 2; do
    case "$(qr_state) $(node_state)" in
      NONE\ *|SUSPENDING\ *|SUSPENDED\ *|FAILED\ *|DELETING\ *|*\ PREEMPTED|*\ TERMINATED) ;;
      *) return 1 ;;
    esac
    [ "$look" = 2 ] || sleep "$POLL"
  done
}
worker_count() {
  local ips
  ips="$(gcloud compute tpus tpu-vm describe "$TPU" "${GCLOUD_ARGS[@]}" --format='value(networkEndpoints.ipAddress)')"
  tr ';' '\n' <<< "$ips" | grep -c .
}
delete_slice() {
  say "deleting the queued resource $TPU"
  gcloud compute tpus queued-resources delete "$TPU" "${GCLOUD_ARGS[@]}" --force --quiet || true
}

NEW_SLICE=0
ensure_slice() {  # returns once the queued resource is ACTIVE and its node READY (NEW_SLICE=1: made now)
  local backoff="$POLL" state node out
  NEW_SLICE=0
  while :; do
    state="$(qr_state)"
    case "$state" in
      ACTIVE)
        node="$(node_state)"
        [ "$node" = READY ] && return 0
        case "$node" in PREEMPTED|TERMINATED|STOPPED) delete_slice ;; *) say "slice ACTIVE, node $node: waiting" ;; esac ;;
      NONE)
        say "asking for $TYPE ($CAPACITY, runtime $VERSION) as queued resource $TPU"
        NEW_SLICE=1
        if ! out="$(gcloud compute tpus queued-resources create "$TPU" --project "$PROJECT" --node-id "$TPU" \
             --accelerator-type "$TYPE" --runtime-version "$VERSION" "${CAPACITY_ARGS[@]}" 2>&1)"; then
          echo "$out" >&2
          if grep -qE "INVALID_ARGUMENT|PERMISSION_DENIED|UNAUTHENTICATED|not found|Invalid" <<< "$out"; then
            say "the request was refused; fix it and run again" >&2; exit 2
          fi
          say "the request failed (capacity or quota?); again in ${backoff}s"
          sleep "$backoff"; backoff=$(( backoff * 2 > MAX_BACKOFF ? MAX_BACKOFF : backoff * 2 )); continue
        fi ;;
      FAILED|SUSPENDED)
        say "queued resource $TPU is $state; asking again in ${backoff}s"
        delete_slice
        sleep "$backoff"; backoff=$(( backoff * 2 > MAX_BACKOFF ? MAX_BACKOFF : backoff * 2 )); continue ;;
      *) say "queued resource $TPU: $state" ;;  # WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDING, UNKNOWN...
    esac
    sleep "$POLL"
  done
}

key_in_agent() {  # gcloud refuses --worker=all while an ssh-agent runs without its key
  local key="$HOME/.ssh/google_compute_engine" print
  [ -n "${SSH_AUTH_SOCK:-}" ] && [ -f "$key" ] || return 0
  print="$(ssh-keygen -lf "$key" 2>/dev/null | awk '{print $2}')"
  ssh-add -l 2>/dev/null | grep -qF "$print" && return 0
  say "adding $key to your ssh-agent (gcloud reaches every worker through it)"
  ssh-add "$key" || { echo "run 'ssh-add $key': gcloud's --worker=all needs the key in the agent" >&2; exit 2; }
}

on_workers() {  # on_workers WORKER COMMAND: WORKER is a number or "all"
  gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_ARGS[@]}" --worker="$1" --command "$2"
}

set_up_workers() {
  say "setting up the workers at ${RUN_COMMIT:0:12}"
  on_workers all "mkdir -p ~/semppl"
  gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TMP/tpu_worker-$RUN_COMMIT.sh" "$TPU:semppl/" "${GCLOUD_ARGS[@]}" --worker=all
  on_workers all "bash ~/semppl/tpu_worker-$RUN_COMMIT.sh setup $RUN_COMMIT"
}

start_attempt() {  # start_attempt ATTEMPT WORKERS: the preflight, then training, on every worker
  local attempt="$1" workers="$2" args=() i pids=() quoted
  args=(--distributed "--config=$CONFIG" "--workdir=$WORKDIR" "--config.dataset.data_dir=$DATA_DIR"
        "--config.dataset.subset_cache_dir=$LABEL_LISTS" --config.dataset.fetch_subsets=True
        "--expect_processes=$workers" "--expect_platform=$EXPECT_PLATFORM" ${LAUNCHER_ARGS[@]+"${LAUNCHER_ARGS[@]}"})
  quoted="$(printf '%q ' "${args[@]}")"
  on_workers all "bash ~/semppl/tpu_worker-$RUN_COMMIT.sh stop-all"
  printf 'attempt %s\ncommit %s\nworkers %s\n' "$attempt" "$RUN_COMMIT" "$workers" | wd_put "$WORKDIR/logs/latest"
  say "attempt $attempt on $workers workers: logs in $WORKDIR/logs/$attempt/"
  for i in $(seq 0 $(( workers - 1 ))); do  # one ssh a worker: each is told its number
    on_workers "$i" "bash ~/semppl/tpu_worker-$RUN_COMMIT.sh start $RUN_COMMIT $attempt $i $WORKDIR/logs/$attempt -- $quoted" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
}

# ---------------------------------------------------------------- following an attempt
LOG_PART=0 LOG_BYTES=0
show_new_log() {  # worker 0's output since the last call: a local file, or its newest parts on a bucket
  local log="$1/worker0/output.log" part size
  case "$log" in
    gs://*)
      for part in $(gcloud storage ls "$log.parts/" 2>/dev/null | sort); do
        [ "$((10#$(basename "$part")))" -ge "$LOG_PART" ] || continue
        if [ "$((10#$(basename "$part")))" -gt "$LOG_PART" ]; then LOG_PART=$((10#$(basename "$part"))) LOG_BYTES=0; fi
        gcloud storage cat "$part" > "$TMP/part" 2>/dev/null || continue
        size="$(wc -c < "$TMP/part")"
        tail -c "+$(( LOG_BYTES + 1 ))" "$TMP/part"
        LOG_BYTES="$size"
      done ;;
    *)
      [ -f "$log" ] || return 0
      tail -c "+$(( LOG_BYTES + 1 ))" "$log"
      LOG_BYTES="$(wc -c < "$log")" ;;
  esac
}

attempt_outcome() {  # ATTEMPT WORKERS [AGE] -> running | running-failed CODE | stale | the exit status
  local dir="$WORKDIR/logs/$1" workers="$2" age="${3:-0}" i st state code now running=0 failed="" preempted=0
  local preflight=0
  now="$(date +%s)"
  for i in $(seq 0 $(( workers - 1 ))); do
    st="$(wd_cat "$dir/worker$i/status" || true)"
    state="$(status_field "$st" state)"
    if [ "$state" = exited ]; then
      code="$(status_field "$st" exit_status)"
      case "$code" in 0) ;; 75) preempted=1 ;; 78) preflight=1 ;; *) failed="${failed:-$code}" ;; esac
    elif [ "$state" = running ] && [ $(( now - $(status_field "$st" heartbeat) )) -lt "$STALE" ]; then
      running=$(( running + 1 ))
    elif [ -n "$state" ] || [ "$age" -gt "$STALE" ]; then
      echo stale; return  # a worker that stopped beating (its VM went), or never started
    else
      running=$(( running + 1 ))  # not started yet
    fi
  done
  if [ "$running" -gt 0 ]; then
    if [ -n "$failed" ]; then echo "running-failed $failed"; else echo running; fi
  elif [ "$preflight" = 1 ]; then echo 78
  elif [ -n "$failed" ]; then echo "$failed"
  elif [ "$preempted" = 1 ]; then echo 75
  else echo 0
  fi
}

follow() {  # follow ATTEMPT WORKERS -> the outcome when the attempt ends: a status, stale or lost
  local attempt="$1" workers="$2" outcome started failed_at=""
  started="$(date +%s)"
  LOG_PART=0 LOG_BYTES=0
  while :; do
    show_new_log "$WORKDIR/logs/$attempt" >&2
    if slice_gone; then echo lost; return; fi
    outcome="$(attempt_outcome "$attempt" "$workers" $(( $(date +%s) - started )))"
    case "$outcome" in
      running) ;;
      running-failed*)  # the others wait for a dead peer: stop them after a grace period
        failed_at="${failed_at:-$(date +%s)}"
        if [ $(( $(date +%s) - failed_at )) -ge "$POLL" ]; then
          on_workers all "bash ~/semppl/tpu_worker-$RUN_COMMIT.sh stop-all" >&2 || true
          echo "${outcome#running-failed }"; return
        fi ;;
      0|75|78) echo "$outcome"; return ;;
      *)  # a crash, or workers dying with their VMs before the slice says so: look again
        sleep "$POLL"
        if slice_gone; then echo lost; else echo "$outcome"; fi
        return ;;
    esac
    sleep "$POLL"
  done
}

live_attempt() {  # the attempt recorded in the workdir, if it still runs: "ATTEMPT WORKERS"
  local latest attempt workers
  latest="$(wd_cat "$WORKDIR/logs/latest" || true)"
  attempt="$(status_field "$latest" attempt)"
  workers="$(status_field "$latest" workers)"
  if [ -n "$attempt" ] && [[ "$(attempt_outcome "$attempt" "$workers" $(( STALE + 1 )))" == running* ]]; then
    echo "$attempt $workers"
  fi
}

# ---------------------------------------------------------------- the loop
for restart in $(seq 0 "$MAX_RESTARTS"); do
  ensure_slice
  attempt="" workers=""
  if [ "$NEW_SLICE" = 0 ]; then  # on new VMs nothing runs yet, whatever the bucket last heard
    read -r attempt workers <<< "$(live_attempt || true)"
  fi
  if [ -n "${attempt:-}" ]; then
    say "following the running attempt $attempt ($workers workers); closing this terminal stops nothing"
  else
    workers="$(worker_count)"
    key_in_agent
    attempt="$(date -u +%Y%m%d-%H%M%S)"
    set_up_workers
    start_attempt "$attempt" "$workers"
  fi
  outcome="$(follow "$attempt" "$workers")"
  case "$outcome" in
    0) say "finished: $WORKDIR"; exit 0 ;;
    75) say "preempted after saving (restart $restart): starting again" ;;
    lost) say "the slice was lost (restart $restart): asking again and resuming"; delete_slice ;;
    stale) say "a worker stopped reporting (restart $restart): starting again on the same slice" ;;
    78) say "the preflight found a problem (its table is above; every worker: $WORKDIR/logs/$attempt/);" \
            "nothing was trained" >&2
        exit 78 ;;
    *) say "the run failed with status $outcome; each worker's log: $WORKDIR/logs/$attempt/worker<i>/" >&2
       exit "$outcome" ;;
  esac
done
say "gave up after $MAX_RESTARTS restarts" >&2
exit 1
