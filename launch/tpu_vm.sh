#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM (pod slice), from a checkout synced to each worker.
#
#   launch/tpu_vm.sh NAME ZONE [--setup] -- lavie-sample --distributed --config configs/base.py \
#       --checkpoint ckpt/base --prompt-file prompts.txt --output res
#
# --setup first copies this checkout to ~/lavie-jax on every worker and installs it with the TPU jax wheel.
# Every worker runs the same command; `--distributed` makes each join the run (jax.distributed.initialize, which
# detects the TPU workers), so the mesh spans the whole slice.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 NAME ZONE [--setup] -- COMMAND..." >&2
  exit 2
fi
name=$1 zone=$2
shift 2
setup=0
if [[ ${1:-} == --setup ]]; then setup=1; shift; fi
if [[ ${1:-} != -- ]]; then echo "$0: put '--' before the command" >&2; exit 2; fi
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"; }
if [[ $setup == 1 ]]; then
  gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all "$repo" "$name":~/lavie-jax
  ssh_all "cd ~/lavie-jax && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'"
fi
ssh_all "cd ~/lavie-jax && .venv/bin/$(printf '%q ' "$@")"
