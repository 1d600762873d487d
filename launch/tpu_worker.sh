#!/usr/bin/env bash
# What each TPU VM worker runs; launch/tpu_pod.sh sends it over ssh. Every command may
# run twice (gcloud retries a worker's ssh), so each one is idempotent.
#
#   tpu_worker.sh setup COMMIT
#       The code at COMMIT (from ~/semppl/code-COMMIT.tar.gz, which the launcher copied)
#       and a virtual environment with the pinned requirements and jax[tpu] at the pin,
#       on a Python 3.11 that uv manages. The TPU images' own python3 is 3.10 (Ubuntu
#       22.04), older than jax, jaxlib and numpy's pins allow, so it only installs uv.
#   tpu_worker.sh start COMMIT ATTEMPT WORKER LOG_DIR -- LAUNCHER_ARGS...
#       The preflight (--mode=check), then training, detached from this ssh session
#       (setsid nohup) under semppl_jax.supervise: output and exit status go to
#       LOG_DIR/worker<WORKER>/ on the bucket. Does nothing if ATTEMPT already runs here.
#   tpu_worker.sh stop-all
#       Stops every run of this project on this worker (before a new attempt starts).
set -euo pipefail
BASE="$HOME/semppl"
PYTHON_VERSION=3.11  # what the pins are tested with (requirements.txt)
UV_VERSION=0.13.8

log() { echo "[worker $(hostname)] $*" >&2; }

find_uv() {  # prints a uv of UV_VERSION, installing it for this user if needed
  local uv
  for uv in "$(command -v uv || true)" "$HOME/.local/bin/uv"; do
    if [ -n "$uv" ] && [ -x "$uv" ] && [ "$("$uv" --version 2>/dev/null | cut -d' ' -f2)" = "$UV_VERSION" ]; then
      echo "$uv"; return 0
    fi
  done
  log "installing uv $UV_VERSION"
  # pip first (every TPU image has it); uv's installer where pip is missing or refuses (PEP 668 images)
  python3 -m pip install --user --quiet --disable-pip-version-check "uv==$UV_VERSION" >&2 \
    || curl -LsSf "https://astral.sh/uv/$UV_VERSION/install.sh" | env UV_NO_MODIFY_PATH=1 sh >&2
  echo "$HOME/.local/bin/uv"
}

setup() {
  local commit="$1" code="$BASE/code/$1"
  if [ ! -f "$code/.complete" ]; then
    rm -rf "$code.partial" && mkdir -p "$code.partial"
    tar -xzf "$BASE/code-$commit.tar.gz" -C "$code.partial"
    rm -rf "$code" && mv "$code.partial" "$code" && touch "$code/.complete"
  fi
  local pins venv uv jax_pin
  pins="$(sha1sum "$code/requirements.txt" | cut -c1-12)"
  venv="$BASE/venv-$PYTHON_VERSION-$pins"
  if [ ! -f "$venv/.complete" ]; then
    uv="$(find_uv)"
    jax_pin="$(sed -n 's/^jax==//p' "$code/requirements.txt")"
    log "creating $venv: Python $PYTHON_VERSION (uv-managed), the pins and jax[tpu]==$jax_pin"
    rm -rf "$venv"
    "$uv" venv --quiet --python "$PYTHON_VERSION" --python-preference only-managed "$venv"
    "$uv" pip install --quiet --python "$venv/bin/python" -r "$code/requirements.txt" "jax[tpu]==$jax_pin"
    touch "$venv/.complete"
  fi
  ln -sfn "$venv" "$code/.venv"
  log "ready: $code at $commit, $("$venv/bin/python" --version)"
}

start() {
  local commit="$1" attempt="$2" worker="$3" log_dir="$4"
  shift 4
  [ "${1:-}" = "--" ] && shift
  local code="$BASE/code/$commit" run="$BASE/runs/$attempt"
  mkdir -p "$run"
  if [ -f "$run/pid" ] && kill -0 "$(cat "$run/pid")" 2>/dev/null; then
    log "attempt $attempt already runs here (pid $(cat "$run/pid"))"; return 0
  fi
  [ -f "$code/.complete" ] && [ -x "$code/.venv/bin/python" ] || { log "not set up for $commit"; return 1; }
  cd "$code"
  local py="$code/.venv/bin/python"
  # The preflight first; training only if it passed. A new session: no SIGHUP from ssh.
  setsid nohup "$py" -m semppl_jax.supervise --log_dir="${log_dir%/}/worker$worker" -- \
    bash -c '"$0" -m semppl_jax.main "$@" --mode=check && exec "$0" -m semppl_jax.main "$@"' "$py" "$@" \
    > "$run/supervisor.log" 2>&1 < /dev/null 9>&- &
  echo $! > "$run/pid"
  log "started attempt $attempt (pid $!): logs in ${log_dir%/}/worker$worker"
}

stop_all() {
  local pidfile pid holders
  for pidfile in "$BASE"/runs/*/pid; do
    [ -f "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
      log "stopping $(basename "$(dirname "$pidfile")") (pid $pid)"
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
  # Whatever else holds the TPU (a run started by another login, a process that outlived its
  # supervisor) would make JAX fall back to the CPU: freed by device, as libtpu asks.
  if compgen -G "/dev/accel*" >/dev/null || compgen -G "/dev/vfio/[0-9]*" >/dev/null; then
    holders="$(sudo -n lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u | tr '\n' ' ' || true)"
    if [ -n "${holders// }" ]; then log "freeing the TPU from pids $holders"; sudo -n kill -9 $holders || true; fi
    sudo -n rm -f /tmp/libtpu_lockfile || true
  fi
}

locked() {  # one setup or start at a time on this worker (gcloud may run a command again)
  mkdir -p "$BASE"
  exec 9> "$BASE/.lock"
  flock 9
  "$@"
}

case "${1:-}" in
  setup) locked setup "$2" ;;
  start) shift; locked start "$@" ;;
  stop-all) locked stop_all ;;
  *) echo "usage: tpu_worker.sh setup COMMIT | start COMMIT ATTEMPT WORKER LOG_DIR -- ARGS... | stop-all" >&2
     exit 2 ;;
esac
