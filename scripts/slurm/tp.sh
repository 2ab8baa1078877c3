# Sourced by tp_1node.sbatch and tp_2node.sbatch after common.sh: one torchrun per node (started by
# srun), each starting one rank per GPU; tp.py shards the model over all of them. Configure with:
#   ENGINE_TP_JOB     generate (default) | profile | benchmark: what every rank runs
#   ENGINE_NPROC      ranks per node (default: the GPUs Slurm gave the node)
#   ENGINE_RDZV_PORT  the c10d rendezvous port on the first node (two nodes or more; default 29500)
#   ENGINE_DIST_TIMEOUT  seconds a collective waits for a dead or stuck rank before failing (default 600)
NPROC="${ENGINE_NPROC:-${SLURM_GPUS_ON_NODE:-1}}"
NNODES="${SLURM_NNODES:-1}"
# The task's CPUs are shared by the node's ranks.
export OMP_NUM_THREADS=$(( OMP_NUM_THREADS / NPROC > 0 ? OMP_NUM_THREADS / NPROC : 1 ))
DIST=(--dist_timeout "${ENGINE_DIST_TIMEOUT:-600}")

case "${ENGINE_TP_JOB:-generate}" in
    generate)
        CMD=(generate.py "${DIST[@]}" "${DEVICE_ARGS[@]}" "${EXTRA_ARGS[@]}" "$@") ;;
    profile)  # one trace per rank: outputs/<name>-<job id>_rank<r>.*
        CMD=(generate.py "${DIST[@]}" --max_new_tokens 64 "${DEVICE_ARGS[@]}" "${EXTRA_ARGS[@]}" "$@"
             --profile "${SLURM_JOB_NAME:-tp}-${JOB_TAG}") ;;
    benchmark)
        CMD=(-m scripts.benchmark --out "${ENGINE_OUTPUTS}/benchmark-tp$(( NPROC * NNODES ))-${JOB_TAG}.json"
             "${DEVICE_ARGS[@]}" "${EXTRA_ARGS[@]}" "$@") ;;
    *)
        echo "ENGINE_TP_JOB must be generate, profile or benchmark, got '${ENGINE_TP_JOB}'" >&2
        exit 2 ;;
esac

if (( NNODES > 1 )); then
    # Every node's torchrun meets at the first node; the job id keeps concurrent jobs apart.
    MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
    RDZV=(--nnodes "${NNODES}" --rdzv_id "${JOB_TAG}" --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR}:${ENGINE_RDZV_PORT:-29500}")
else
    RDZV=(--standalone)  # a free local port: jobs sharing a node do not collide
fi
# --kill-on-bad-exit: a node whose ranks fail takes the other nodes down with it.
LAUNCH=(srun --nodes "${NNODES}" --ntasks-per-node 1 --kill-on-bad-exit=1
        "${PYTHON}" -m torch.distributed.run "${RDZV[@]}" --nproc_per_node "${NPROC}")
echo "+ ${LAUNCH[*]} ${CMD[*]}"
"${LAUNCH[@]}" "${CMD[@]}"
