#!/usr/bin/env bash
# The main job: sets up .venv on first use, then runs SemPPL on the embedded real
# MNIST digits (pretrain, fine-tune, k-NN, export) on the CPU. WORKDIR=... to move it.
set -euo pipefail
source "$(dirname "$0")/scripts/setup_env.sh"
WORKDIR="${WORKDIR:-workdir_demo}"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=2}"
python -m semppl_jax.demo --workdir="$WORKDIR" "$@"
