#!/usr/bin/env bash
# Offline `gradstore index` across GPUs and nodes with torchrun.
#
#   deploy/torchrun-index.sh RUN_TOML [extra `gradstore index` flags, e.g. --quiet]
#
# Every rank logs the store chunks it owns (chunk k belongs to rank k % world size), so ranks never write the
# same chunk; rank 0 builds the index after a barrier. Re-running resumes: finished chunks are skipped.
# Ranks use NCCL on GPUs and gloo on CPU (set CUDA_VISIBLE_DEVICES= to force CPU). On several nodes the
# store (and the checkpoints in RUN_TOML) must be on a filesystem that every node sees at the same path.
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  processes on this node [number of visible GPUs, or 1 without GPUs]
#   NNODES          number of nodes [1]
#   NODE_RANK       this node's rank, 0 .. NNODES-1 [0]
#   MASTER_ADDR     address of node 0, reachable from every node [127.0.0.1]
#   MASTER_PORT     free TCP port on node 0 [29500]
#   TORCHRUN        the launcher [torchrun]
#
# Example, 2 nodes x 8 GPUs: on node 0
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 deploy/torchrun-index.sh /data/run.toml
# and on node 1 the same with NODE_RANK=1.
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    [ $# -lt 1 ] && exit 2 || exit 0
fi
config="$1"
shift
if [ ! -f "$config" ]; then
    echo "torchrun-index: run config '$config' not found" >&2
    exit 2
fi

if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

echo "torchrun-index: node ${NODE_RANK}/${NNODES}, ${NPROC_PER_NODE} processes, master ${MASTER_ADDR}:${MASTER_PORT}, config ${config}" >&2
exec "${TORCHRUN:-torchrun}" \
    --nnodes "$NNODES" \
    --node-rank "$NODE_RANK" \
    --nproc-per-node "$NPROC_PER_NODE" \
    --master-addr "$MASTER_ADDR" \
    --master-port "$MASTER_PORT" \
    -m gradstore.server.cli index --config "$config" "$@"
