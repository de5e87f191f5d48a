#!/usr/bin/env bash
# Train on several nodes without a scheduler: run this once on every node.
set -euo pipefail

usage() {
    cat <<'TXT'
usage: launch/multi_node.sh [--config FILE] [key=value ...]

Runs `torchrun -m distnn.train` on this node, every argument passed through. Start it on each
of the NNODES nodes with the same NNODES, MASTER_ADDR, MASTER_PORT and RDZV_ID.
Environment:
  NNODES          number of nodes (required)
  MASTER_ADDR     address every node can reach: the rendezvous host (required)
  MASTER_PORT     its port (default 29500)
  RDZV_ID         job id shared by the nodes of one job (default distnn)
  RDZV_BACKEND    c10d (default: nodes join in any order, restarts re-rendezvous) or static
                  (fixed ranks: then NODE_RANK is required)
  NODE_RANK       this node's rank, 0..NNODES-1 (static rendezvous)
  NPROC_PER_NODE  processes per node (default auto: one per GPU)
  MAX_RESTARTS    torchrun restarts of the group after a failure (default 0)
  PYTHON          the interpreter (default python)
Example, on each of 4 nodes:
  NNODES=4 MASTER_ADDR=node001 launch/multi_node.sh --config configs/imagenet_resnet50.yaml
TXT
}
case "${1:-}" in -h | --help) usage; exit 0 ;; esac

: "${NNODES:?NNODES is required (launch/multi_node.sh -h)}"
: "${MASTER_ADDR:?MASTER_ADDR is required (launch/multi_node.sh -h)}"
port=${MASTER_PORT:-29500}
case "${RDZV_BACKEND:-c10d}" in
    c10d) rdzv=(--rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$port"
                --rdzv_id="${RDZV_ID:-distnn}") ;;
    static) rdzv=(--node_rank="${NODE_RANK:?NODE_RANK is required with RDZV_BACKEND=static}"
                  --master_addr="$MASTER_ADDR" --master_port="$port") ;;
    *) echo "error: RDZV_BACKEND=${RDZV_BACKEND} is not c10d or static" >&2; exit 2 ;;
esac

exec "${PYTHON:-python}" -m torch.distributed.run --nnodes="$NNODES" "${rdzv[@]}" \
    --nproc_per_node="${NPROC_PER_NODE:-auto}" --max-restarts="${MAX_RESTARTS:-0}" \
    -m distnn.train "$@"
