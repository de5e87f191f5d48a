#!/usr/bin/env bash
# Train on one node: torchrun --standalone with one process per GPU (or NPROC processes).
set -euo pipefail

usage() {
    cat <<'TXT'
usage: launch/single_node.sh [--config FILE] [key=value ...]

Runs `torchrun --standalone -m distnn.train` with every argument passed through.
Environment:
  NPROC         processes on this node (default auto: one per GPU; on CPU, one per core)
  MAX_RESTARTS  torchrun restarts of the whole group after a failure (default 0)
  PYTHON        the interpreter (default python)
Example:
  NPROC=8 launch/single_node.sh --config configs/cifar10_resnet18.yaml train.epochs=30
TXT
}
case "${1:-}" in -h | --help) usage; exit 0 ;; esac

exec "${PYTHON:-python}" -m torch.distributed.run --standalone \
    --nproc_per_node="${NPROC:-auto}" --max-restarts="${MAX_RESTARTS:-0}" \
    -m distnn.train "$@"
