# Sourced by every batch script here: go to the repository, set up the environment, run one command.
# Configure with variables (exported at submission; sbatch passes the environment on), never by editing:
#   ENGINE_DIR        the repository (default: the directory sbatch was called from)
#   ENGINE_MODULES    modules to load, e.g. "cuda/12.4 gcc/12"
#   ENGINE_CONDA_ENV  a conda environment to activate
#   ENGINE_VENV       a virtual environment folder to activate (e.g. .venv)
#   ENGINE_SETUP      any other shell set-up, run last, e.g. "source ~/.bashrc; export HF_HOME=/scratch/hf"
#   ENGINE_PYTHON     the interpreter (default python3)
#   ENGINE_DEVICE     cpu or cuda: passed as --device (default: the engine picks cuda when it sees one)
#   ENGINE_ARGS       extra arguments for the command (so do the batch script's own arguments, "$@")
#   ENGINE_OUTPUTS    where results go (default outputs/; the logs follow sbatch's --output)
set -euo pipefail

cd "${ENGINE_DIR:-${SLURM_SUBMIT_DIR:-.}}"
export ENGINE_OUTPUTS="${ENGINE_OUTPUTS:-outputs}"  # profiling.py writes here too
mkdir -p "${ENGINE_OUTPUTS}"
if [[ -n "${ENGINE_MODULES:-}" ]]; then
    module load ${ENGINE_MODULES}
fi
if [[ -n "${ENGINE_CONDA_ENV:-}" ]]; then
    eval "$(conda shell.bash hook)"
    conda activate "${ENGINE_CONDA_ENV}"
fi
if [[ -n "${ENGINE_VENV:-}" ]]; then
    source "${ENGINE_VENV}/bin/activate"
fi
if [[ -n "${ENGINE_SETUP:-}" ]]; then
    eval "${ENGINE_SETUP}"
fi
PYTHON="${ENGINE_PYTHON:-python3}"
# Intra-op threads = the CPUs Slurm gave the task (torch would otherwise use every core of the node).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
JOB_TAG="${SLURM_JOB_ID:-local}"
if [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]]; then
    JOB_TAG="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
fi
DEVICE_ARGS=()
if [[ -n "${ENGINE_DEVICE:-}" ]]; then
    DEVICE_ARGS=(--device "${ENGINE_DEVICE}")
fi
read -r -a EXTRA_ARGS <<< "${ENGINE_ARGS:-}"

echo "job ${JOB_TAG} (${SLURM_JOB_NAME:-interactive}) on $(hostname) at $(date -Is)"
echo "repo $(pwd) @ $(git rev-parse --short HEAD 2>/dev/null || echo '?'); python $(command -v "${PYTHON}")"
if command -v nvidia-smi >/dev/null && [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi

# engine_run ARGS...: print the command, then run it with the interpreter.
engine_run() {
    echo "+ ${PYTHON} $*"
    "${PYTHON}" "$@"
}
