#!/bin/bash
# Submit a batch job with resources picked from its size:
#   scripts/slurm/submit.sh SIZE JOB [arguments for the job's command]
#   SIZE  cpu       no GPU, --device cpu,  4 CPUs,  16G, 1 h
#         gpu       1 GPU,                 8 CPUs,  64G, 2 h   (one generation, a profile, the benchmark)
#         gpu-long  1 GPU,                 8 CPUs, 128G, 12 h  (the full evaluation sweep, long contexts)
#   JOB   generate | profile | evaluate | benchmark | strategies_array (a scripts/slurm/JOB.sbatch)
# Override any figure with ENGINE_GRES, ENGINE_CPUS, ENGINE_MEM, ENGINE_TIME; more sbatch options
# (partition, account, QOS, constraint) with SBATCH_EXTRA="--partition=gpu --account=abc".
# DRY_RUN=1 prints the sbatch command instead of running it.
set -euo pipefail
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
(( $# >= 2 )) || usage
SIZE="$1" JOB="${2%.sbatch}"
shift 2
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SCRIPT="scripts/slurm/${JOB}.sbatch"
[[ -f "${REPO}/${SCRIPT}" ]] || { echo "no job '${JOB}' (${SCRIPT} not found)" >&2; usage; }

case "${SIZE}" in
    cpu)      gres=""      cpus=4 mem=16G  time=01:00:00; export ENGINE_DEVICE=cpu ;;
    gpu)      gres="gpu:1" cpus=8 mem=64G  time=02:00:00; export ENGINE_DEVICE="${ENGINE_DEVICE:-cuda}" ;;
    gpu-long) gres="gpu:1" cpus=8 mem=128G time=12:00:00; export ENGINE_DEVICE="${ENGINE_DEVICE:-cuda}" ;;
    *) echo "unknown size '${SIZE}'" >&2; usage ;;
esac
gres="${ENGINE_GRES-$gres}" cpus="${ENGINE_CPUS:-$cpus}" mem="${ENGINE_MEM:-$mem}" time="${ENGINE_TIME:-$time}"
opts=(--cpus-per-task="${cpus}" --mem="${mem}" --time="${time}")
if [[ -n "${gres}" ]]; then
    opts+=(--gres="${gres}")
fi
if [[ "${SIZE}" != cpu && "${JOB}" == benchmark ]]; then
    opts+=(--exclusive)  # timings want the GPU (and its host) to themselves
fi
read -r -a extra <<< "${SBATCH_EXTRA:-}"

cd "${REPO}"  # logs (outputs/...) are relative to the submission directory
mkdir -p outputs
cmd=(sbatch "${opts[@]}" "${extra[@]}" "${SCRIPT}" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"; echo
else
    "${cmd[@]}"
fi
