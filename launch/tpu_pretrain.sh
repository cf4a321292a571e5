#!/usr/bin/env bash
# shellcheck disable=SC2016  # single-quoted $HOME/$PATH are meant to expand on the workers
# Pretrain BERT on a Cloud TPU VM (a single host or a pod slice) with `bert-jax pretrain`.
#
#   launch/tpu_pretrain.sh --tpu bert-v4 --zone us-central2-b --project my-proj \
#     --accelerator-type v4-32 --bucket gs://my-bucket --config configs/bert_base_paper.py \
#     --run-name base-wiki --data tfds:wikipedia/20230601.en [--spot] [--dry-run] \
#     [-- --config.total_steps=200 ...]
#
# What it does, in order (each command is echoed with a "+ " prefix; --dry-run only echoes):
#   1. `gcloud compute tpus tpu-vm describe`: reuse the TPU VM when it exists and is not
#      PREEMPTED/TERMINATED (those are deleted and created again); create it when it is absent.
#   2. Ship this checkout to every worker and install it there: the tracked and untracked
#      (not ignored) files are packed into one tarball, copied with `tpu-vm scp --worker=all`
#      and pip-installed with `tpu-vm ssh --worker=all`. Copying the working tree means the pod
#      runs exactly the code you have here, committed or not, and needs no access to a git host.
#      `--pip-spec 'bert-jax[gcs] @ git+https://...@TAG'` installs that instead.
#   3. `bert-jax pretrain --config ... --workdir gs://BUCKET/runs/RUN ...` on every worker at
#      once (`--worker=all`); jax.distributed.initialize() finds the other hosts of the slice.
#
# Preemption: run the same command again. A preempted TPU VM is recreated and the run resumes
# from the newest checkpoint in gs://BUCKET/runs/RUN/checkpoints (and the data iterator's
# position saved with it).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pretrain.sh --tpu NAME --zone ZONE --bucket gs://BUCKET --run-name RUN
         [--project PROJECT] [--accelerator-type v4-32] [--version RUNTIME]
         [--config configs/bert_base_paper.py] [--data SPEC] [--tfds-data-dir gs://...]
         [--vocab gs://.../vocab.txt] [--spot | --preemptible] [--pip-spec SPEC]
         [--skip-install] [--detach] [--dry-run] [-- --config.x=y ...]

  --tpu NAME              TPU VM name (created when absent, reused when it exists)
  --zone ZONE             e.g. us-central2-b (v4), us-east5-a (v5p), us-east1-d (v6e)
  --project PROJECT       GCP project (default: gcloud's core/project)
  --accelerator-type T    e.g. v4-8, v4-32, v5p-64, v5litepod-16 (default v4-8)
  --version RUNTIME       TPU VM software version (default chosen from the accelerator type)
  --bucket gs://BUCKET    checkpoints, metrics and TensorBoard go to gs://BUCKET/runs/RUN
  --run-name RUN          run directory name under gs://BUCKET/runs/
  --config FILE[:ARG]     ml_collections config (default configs/bert_base_paper.py)
  --data SPEC             corpus for vocab/data creation: text files (gs://B/corpus/*.txt,
                          comma-separated) or a TFDS name (tfds:wikipedia/20230601.en)
  --tfds-data-dir DIR     TFDS_DATA_DIR on the workers (default gs://BUCKET/tensorflow_datasets
                          when --data is tfds:...)
  --vocab PATH            an existing vocab.txt (default: trained into the workdir)
  --spot | --preemptible  create a Spot / preemptible TPU VM
  --pip-spec SPEC         pip-install SPEC on the workers instead of this checkout
  --skip-install          do not (re)install the package on the workers
  --detach                run in the background on the workers (log: ~/bert-jax-RUN.log)
  --dry-run               print every command instead of running it
  -- ...                  everything after -- is passed to `bert-jax pretrain`
EOF
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TPU="" ZONE="" PROJECT="" ACCELERATOR="v4-8" VERSION="" BUCKET="" RUN_NAME=""
CONFIG="configs/bert_base_paper.py" DATA="" TFDS_DIR="" VOCAB="" CAPACITY="" PIP_SPEC=""
SKIP_INSTALL=0 DETACH=0 DRY_RUN=0
EXTRA=()

need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "flag $1 expects a value"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) need_value "$@"; TPU="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCELERATOR="$2"; shift 2 ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --bucket) need_value "$@"; BUCKET="${2%/}"; shift 2 ;;
    --run-name) need_value "$@"; RUN_NAME="$2"; shift 2 ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --data) need_value "$@"; DATA="$2"; shift 2 ;;
    --tfds-data-dir) need_value "$@"; TFDS_DIR="$2"; shift 2 ;;
    --vocab) need_value "$@"; VOCAB="$2"; shift 2 ;;
    --spot) CAPACITY="--spot"; shift ;;
    --preemptible) CAPACITY="--preemptible"; shift ;;
    --pip-spec) need_value "$@"; PIP_SPEC="$2"; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --detach) DETACH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown flag $1" ;;
  esac
done

[[ -n "$TPU" ]] || die "--tpu NAME is required"
[[ -n "$ZONE" ]] || die "--zone ZONE is required"
[[ -n "$RUN_NAME" ]] || die "--run-name RUN is required"
[[ "$BUCKET" == gs://* ]] || die "--bucket expects a gs:// URL, got '${BUCKET}'"
[[ "$RUN_NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run-name expects letters, digits, . _ -"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$REPO_ROOT/${CONFIG%%:*}" ]] || die "--config: no such file ${CONFIG%%:*} in $REPO_ROOT"

if [[ -z "$VERSION" ]]; then
  case "$ACCELERATOR" in
    v5litepod-* | v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) VERSION="tpu-ubuntu2204-base" ;;
  esac
fi

WORKDIR="$BUCKET/runs/$RUN_NAME"
if [[ "$DATA" == tfds:* && -z "$TFDS_DIR" ]]; then
  TFDS_DIR="$BUCKET/tensorflow_datasets"
fi

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
LOCATION=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOCATION+=(--project="$PROJECT")

# --- 1. create or reuse the TPU VM ------------------------------------------------------
DESCRIBE=("${GCLOUD_TPU[@]}" describe "$TPU" "${LOCATION[@]}" --format='value(state)')
tpu_state() {
  command -v gcloud >/dev/null 2>&1 || return 1
  "${DESCRIBE[@]}" 2>/dev/null
}

create_tpu() {
  local flags=(--accelerator-type="$ACCELERATOR" --version="$VERSION")
  [[ -n "$CAPACITY" ]] && flags+=("$CAPACITY")
  run "${GCLOUD_TPU[@]}" create "$TPU" "${LOCATION[@]}" "${flags[@]}"
}

# describe is read-only, so it runs under --dry-run too: it decides between create and reuse.
echo "+ $(cmdline "${DESCRIBE[@]}")"
if STATE="$(tpu_state)"; then
  case "$STATE" in
    PREEMPTED | TERMINATED)
      echo "# TPU VM $TPU is $STATE: deleting and creating it again"
      run "${GCLOUD_TPU[@]}" delete "$TPU" "${LOCATION[@]}" --quiet
      create_tpu
      ;;
    *) echo "# reusing TPU VM $TPU (state: ${STATE:-unknown})" ;;
  esac
else
  echo "# TPU VM $TPU not found: creating it"
  create_tpu
fi

ON_ALL_WORKERS=("${GCLOUD_TPU[@]}" ssh "$TPU" "${LOCATION[@]}" --worker=all)

# --- 2. install the package on every worker ---------------------------------------------
# jax[tpu] brings libtpu; the TPU VM image's python3 is >= 3.10.
PIP="python3 -m pip install --user --upgrade"
if [[ "$SKIP_INSTALL" -eq 0 ]]; then
  if [[ -n "$PIP_SPEC" ]]; then
    INSTALL="$PIP 'jax[tpu]' $(shquote "$PIP_SPEC")"
    # The config file must exist on the workers too: ship configs/ beside the install.
    run "${ON_ALL_WORKERS[@]}" --command="mkdir -p bert-jax"
    run "${GCLOUD_TPU[@]}" scp --recurse "$REPO_ROOT/configs" "$TPU:bert-jax/" \
      "${LOCATION[@]}" --worker=all
  else
    TARBALL="$(mktemp -u /tmp/bert-jax-XXXXXX).tar.gz"
    # Tracked plus untracked-but-not-ignored files: what you see here, without venvs or runs.
    run bash -c "cd $(shquote "$REPO_ROOT") && git ls-files -z --cached --others \
--exclude-standard | tar --null --ignore-failed-read -T - -czf $TARBALL"
    run "${GCLOUD_TPU[@]}" scp "$TARBALL" "$TPU:bert-jax.tar.gz" "${LOCATION[@]}" --worker=all
    INSTALL='rm -rf "$HOME/bert-jax" && mkdir -p "$HOME/bert-jax" && '
    INSTALL+='tar -xzf "$HOME/bert-jax.tar.gz" -C "$HOME/bert-jax" && '
    INSTALL+="$PIP 'jax[tpu]' \"\$HOME/bert-jax[gcs]\""
  fi
  run "${ON_ALL_WORKERS[@]}" --command="$INSTALL"
fi

# --- 3. pretrain on every worker at once ------------------------------------------------
# gs:// paths go through etils.epath on the Python side; the TPU VM's service account needs
# read/write access to the bucket (roles/storage.objectAdmin).
PRETRAIN=(bert-jax pretrain --config="$CONFIG" --workdir="$WORKDIR")
if [[ -n "$DATA" ]]; then
  # A comma-separated list becomes a Python list literal for the config override.
  DATA_LIST="[\"${DATA//,/\",\"}\"]"
  PRETRAIN+=("--config.data.input=$DATA_LIST")
fi
[[ -n "$VOCAB" ]] && PRETRAIN+=("--config.data.vocab=$VOCAB")
PRETRAIN+=("${EXTRA[@]}")

REMOTE='cd "$HOME/bert-jax" 2>/dev/null || cd "$HOME"; export PATH="$HOME/.local/bin:$PATH"; '
[[ -n "$TFDS_DIR" ]] && REMOTE+="export TFDS_DATA_DIR=$(shquote "$TFDS_DIR"); "
if [[ "$DETACH" -eq 1 ]]; then
  REMOTE+="nohup $(cmdline "${PRETRAIN[@]}") > \"\$HOME/bert-jax-$RUN_NAME.log\" 2>&1 &"
else
  REMOTE+="$(cmdline "${PRETRAIN[@]}")"
fi
run "${ON_ALL_WORKERS[@]}" --command="$REMOTE"

echo "# workdir: $WORKDIR (checkpoints/, metrics.jsonl, tensorboard/)"
echo "# resume after preemption: run this same command again"
