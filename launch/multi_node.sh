#!/usr/bin/env bash
# Train on several nodes without a scheduler: run this once on every node.
set -euo pipefail

usage() {
    cat <<'TXT'
usage: launch/multi_node.sh [--config FILE] [key=value ...]

Runs `torchrun -m distnn.train` on this node, every argument passed through. Start it on each
node with the same NNODES, MASTER_ADDR, MASTER_PORT and RDZV_ID.
Environment:
  NNODES          number of nodes: N, or MIN:MAX for an elastic job (required). Elastic:
                  when a node is lost the others restart without it from the latest
                  checkpoint while MIN are left; a node that (re)joins makes them restart
                  with it
  MASTER_ADDR     address every node can reach: the rendezvous host (required). With c10d
                  that node's torchrun holds the rendezvous: it must stay up for the job
  MASTER_PORT     its port (default 29500)
  RDZV_ID         job id shared by the nodes of one job (default distnn)
  RDZV_BACKEND    c10d (default: nodes join in any order, restarts re-rendezvous) or static
                  (fixed ranks and a fixed NNODES: then NODE_RANK is required)
  RDZV_CONF       c10d settings, e.g. last_call_timeout=30,join_timeout=600 (seconds)
  NODE_RANK       this node's rank, 0..NNODES-1 (static rendezvous)
  NPROC_PER_NODE  processes per node (default auto: one per GPU)
  MAX_RESTARTS    torchrun restarts of the group after a failure (default 0; 3 with MIN:MAX)
  PYTHON          the interpreter (default python)
Example, on each of 4 nodes:
  NNODES=4 MASTER_ADDR=node001 launch/multi_node.sh --config configs/imagenet_resnet50.yaml
Elastic, 2 to 4 nodes (set train.global_batch so a restart keeps the batch):
  NNODES=2:4 MASTER_ADDR=node001 launch/multi_node.sh --config configs/imagenet_resnet50.yaml
TXT
}
case "${1:-}" in -h | --help) usage; exit 0 ;; esac

: "${NNODES:?NNODES is required (launch/multi_node.sh -h)}"
: "${MASTER_ADDR:?MASTER_ADDR is required (launch/multi_node.sh -h)}"
if [[ $NNODES =~ ^[1-9][0-9]*$ ]]; then
    restarts=0
elif [[ $NNODES =~ ^([1-9][0-9]*):([1-9][0-9]*)$ ]] &&
    ((BASH_REMATCH[1] <= BASH_REMATCH[2])); then
    restarts=3
else
    echo "error: NNODES=$NNODES is not a node count N or MIN:MAX with 1 <= MIN <= MAX" >&2
    exit 2
fi
port=${MASTER_PORT:-29500}
case "${RDZV_BACKEND:-c10d}" in
    c10d)
        rdzv=(--rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$port"
              --rdzv_id="${RDZV_ID:-distnn}" ${RDZV_CONF:+--rdzv_conf="$RDZV_CONF"})
        # A store of its own for the workers of each rendezvous round. torch 2.14 shares the
        # rank-0 agent's store across rounds instead, and a node that joins a running job then
        # waits forever for a MASTER_ADDR that rank 0 wrote for an earlier round.
        export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1} ;;
    static)
        if [[ $NNODES == *:* ]]; then
            echo "error: NNODES=$NNODES (elastic) needs RDZV_BACKEND=c10d, not static" >&2
            exit 2
        fi
        rdzv=(--node_rank="${NODE_RANK:?NODE_RANK is required with RDZV_BACKEND=static}"
              --master_addr="$MASTER_ADDR" --master_port="$port") ;;
    *) echo "error: RDZV_BACKEND=${RDZV_BACKEND} is not c10d or static" >&2; exit 2 ;;
esac

exec "${PYTHON:-python}" -m torch.distributed.run --nnodes="$NNODES" "${rdzv[@]}" \
    --nproc_per_node="${NPROC_PER_NODE:-auto}" --max-restarts="${MAX_RESTARTS:-$restarts}" \
    -m distnn.train "$@"
