#!/usr/bin/env bash
# Pretrain BERT on GPUs with `bert-jax pretrain`: one multi-GPU node, or many nodes via SLURM.
#
# One node (one process drives every local GPU; the mesh's data axis spans them):
#   launch/gpu_pretrain.sh --config configs/bert_base_paper.py --workdir runs/base \
#     --data 'corpus/*.txt' [-- --config.total_steps=200]
#
# SLURM (one process per GPU; jax.distributed.initialize() reads SLURM_* to find its peers):
#   launch/gpu_pretrain.sh --slurm --nodes 4 --gpus-per-node 8 --partition gpu --time 48:00:00 \
#     --config configs/bert_base_paper.py --workdir /shared/runs/base --data '/shared/corpus/*.txt'
# Outside an allocation this writes an sbatch script (--sbatch-file) and submits it; inside
# one (SLURM_JOB_ID set, e.g. under salloc) it runs srun directly.
#
# --dry-run prints every command (and the sbatch script) instead of running it.
# Preemption or a requeue: the same command resumes from the newest checkpoint in --workdir.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu_pretrain.sh --workdir DIR [--config FILE[:ARG]] [--data SPEC] [--vocab PATH]
         [--slurm --nodes N --gpus-per-node G [--partition P] [--account A] [--time T]
          [--job-name J] [--cpus-per-task C] [--sbatch-file PATH]]
         [--dry-run] [-- --config.x=y ...]

  --workdir DIR          checkpoints, metrics.jsonl, tensorboard/ (a shared filesystem or gs://)
  --config FILE[:ARG]    ml_collections config (default configs/bert_base_paper.py)
  --data SPEC            corpus for vocab/data creation (comma-separated files/globs or tfds:NAME)
  --vocab PATH           an existing vocab.txt (default: trained into the workdir)
  --slurm                launch with SLURM: sbatch (or srun inside an allocation)
  --nodes N              SLURM nodes (default 1)
  --gpus-per-node G      GPUs per node = tasks per node (default 8)
  --partition P, --account A, --time T, --job-name J, --cpus-per-task C   sbatch options
  --sbatch-file PATH     where the generated sbatch script goes (default slurm/JOB.sbatch)
  --dry-run              print every command instead of running it
  -- ...                 everything after -- is passed to `bert-jax pretrain`
EOF
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "flag $1 expects a value"
}

need_count() {
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "flag $1 expects a positive integer, got '$2'"
}

CONFIG="configs/bert_base_paper.py" WORKDIR="" DATA="" VOCAB="" SLURM=0 NODES=1 GPUS=8
PARTITION="" ACCOUNT="" TIME="" JOB_NAME="bert-jax-pretrain" CPUS="" SBATCH_FILE="" DRY_RUN=0
EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="${2%/}"; shift 2 ;;
    --data) need_value "$@"; DATA="$2"; shift 2 ;;
    --vocab) need_value "$@"; VOCAB="$2"; shift 2 ;;
    --slurm) SLURM=1; shift ;;
    --nodes) need_value "$@"; need_count "$@"; NODES="$2"; shift 2 ;;
    --gpus-per-node) need_value "$@"; need_count "$@"; GPUS="$2"; shift 2 ;;
    --partition) need_value "$@"; PARTITION="$2"; shift 2 ;;
    --account) need_value "$@"; ACCOUNT="$2"; shift 2 ;;
    --time) need_value "$@"; TIME="$2"; shift 2 ;;
    --job-name) need_value "$@"; JOB_NAME="$2"; shift 2 ;;
    --cpus-per-task) need_value "$@"; need_count "$@"; CPUS="$2"; shift 2 ;;
    --sbatch-file) need_value "$@"; SBATCH_FILE="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown flag $1" ;;
  esac
done

[[ -n "$WORKDIR" ]] || die "--workdir DIR is required"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG_FILE="${CONFIG%%:*}"
[[ -f "$CONFIG_FILE" || -f "$REPO_ROOT/$CONFIG_FILE" ]] || die "--config: no such file $CONFIG_FILE"

PRETRAIN=(bert-jax pretrain --config="$CONFIG" --workdir="$WORKDIR")
if [[ -n "$DATA" ]]; then
  # A comma-separated list becomes a Python list literal for the config override.
  PRETRAIN+=("--config.data.input=[\"${DATA//,/\",\"}\"]")
fi
[[ -n "$VOCAB" ]] && PRETRAIN+=("--config.data.vocab=$VOCAB")
PRETRAIN+=("${EXTRA[@]}")

# Let XLA overlap collectives with compute; keep a little GPU memory for cuDNN/NCCL workspaces,
# unless the user chose a fraction (jax refuses its old and new names set together).
XLA_GPU_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"
GPU_ENV=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }$XLA_GPU_FLAGS")
if [[ -z "${XLA_CLIENT_MEM_FRACTION:-}${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" ]]; then
  GPU_ENV=(XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 "${GPU_ENV[@]}")
fi

if [[ "$SLURM" -eq 0 ]]; then
  run env "${GPU_ENV[@]}" "${PRETRAIN[@]}"
  exit 0
fi

# SLURM: one task per GPU. jax.distributed.initialize() takes the coordinator from the first
# node of SLURM_JOB_NODELIST, the process id from SLURM_PROCID and the GPU from SLURM_LOCALID.
SRUN=(srun --nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-node="$GPUS" --kill-on-bad-exit=1)
[[ -n "$CPUS" ]] && SRUN+=(--cpus-per-task="$CPUS")

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  echo "# inside SLURM allocation $SLURM_JOB_ID: running srun directly"
  run env "${GPU_ENV[@]}" "${SRUN[@]}" "${PRETRAIN[@]}"
  exit 0
fi

SBATCH_FILE="${SBATCH_FILE:-slurm/$JOB_NAME.sbatch}"
sbatch_script() {
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$GPUS"
  echo "#SBATCH --gpus-per-node=$GPUS"
  [[ -n "$CPUS" ]] && echo "#SBATCH --cpus-per-task=$CPUS"
  [[ -n "$PARTITION" ]] && echo "#SBATCH --partition=$PARTITION"
  [[ -n "$ACCOUNT" ]] && echo "#SBATCH --account=$ACCOUNT"
  [[ -n "$TIME" ]] && echo "#SBATCH --time=$TIME"
  echo "#SBATCH --output=slurm-%x-%j.out"
  echo "#SBATCH --open-mode=append"
  # A requeued job (preemption, node failure) resumes from the newest checkpoint.
  echo "#SBATCH --requeue"
  echo "set -euo pipefail"
  echo "cd $(shquote "$PWD")"
  echo "export $(cmdline "${GPU_ENV[@]}")"
  echo "$(cmdline "${SRUN[@]}") $(cmdline "${PRETRAIN[@]}")"
}

if [[ "$DRY_RUN" -eq 1 ]]; then
  echo "# sbatch script $SBATCH_FILE:"
  sbatch_script | sed 's/^/    /'
else
  mkdir -p "$(dirname "$SBATCH_FILE")"
  sbatch_script > "$SBATCH_FILE.tmp"
  mv "$SBATCH_FILE.tmp" "$SBATCH_FILE"
fi
run sbatch "$SBATCH_FILE"
echo "# workdir: $WORKDIR; resubmitting the same script resumes from the newest checkpoint"
