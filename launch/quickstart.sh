#!/usr/bin/env bash
# The whole path on a laptop CPU in a few minutes, on the sample corpus embedded in the package:
#   vocab -> phase-1 (length 128) and phase-2 (length 512) data -> pretrain a tiny BERT through
#   both phases (orbax checkpoints) -> convert to Hugging Face -> fill-mask in transformers ->
#   learning-curve PNG.
#
#   bash launch/quickstart.sh [WORKDIR]          (default: runs/quickstart)
#
# Each step is a command you can run yourself; they are echoed with a "+ " prefix. Rerunning
# with the same WORKDIR reuses the vocab and data and resumes (or skips) the training.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="${1:-runs/quickstart}"
WORKDIR="${WORKDIR%/}"
PYTHON="${PYTHON:-python3}"
# Keep the CPU run quiet and deterministic: no GPU/TPU probing, no oneDNN nondeterminism notes.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

# The console scripts when the package is installed; the modules otherwise.
if command -v bert-jax >/dev/null 2>&1; then
  BERT_JAX=(bert-jax)
  CONVERT=(bert-jax-convert)
else
  BERT_JAX=("$PYTHON" -m bert_jax.cli)
  CONVERT=("$PYTHON" -m bert_jax.convert)
  export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

step() {
  echo
  echo "== $*"
}

run() {
  echo "+ $*"
  "$@"
}

mkdir -p "$WORKDIR"
VOCAB="$WORKDIR/vocab.txt"
DATA_128="$WORKDIR/data/phase_0"
DATA_512="$WORKDIR/data/phase_1"
HF_DIR="$WORKDIR/hf"
PNG="$WORKDIR/learning_curves.png"
CONFIG="$REPO_ROOT/configs/tiny_cpu.py"
START=$SECONDS

step "1/6 train a 3,000-entry uncased WordPiece vocab on the embedded English sample"
if [[ -s "$VOCAB" ]]; then
  echo "(exists: $VOCAB)"
else
  run "${BERT_JAX[@]}" train-vocab --input sample:en --vocab-size 3000 --lower-case \
    --output "$VOCAB"
fi

step "2/6 create MLM+NSP instances: phase 1 at length 128 (20 predictions), phase 2 at 512 (80)"
for spec in "$DATA_128:128:20" "$DATA_512:512:80"; do
  IFS=: read -r out seq_len predictions <<<"$spec"
  if [[ -f "$out/manifest.json" ]]; then
    echo "(exists: $out)"
    continue
  fi
  run "${BERT_JAX[@]}" create-data --input sample:en --vocab "$VOCAB" --output "$out" \
    --max-seq-length "$seq_len" --max-predictions-per-seq "$predictions" --dupe-factor 3 \
    --eval-fraction 0.05 --no-progress
done

step "3/6 pretrain BERT-tiny (2 layers x 128): 270 steps at 128, then 30 at 512"
run "${BERT_JAX[@]}" pretrain --config "$CONFIG" --workdir "$WORKDIR" \
  --config.data.vocab="$VOCAB" --config.phases.0.data="$DATA_128" \
  --config.phases.1.data="$DATA_512"

step "4/6 convert the newest checkpoint to a Hugging Face directory (safetensors)"
run "${CONVERT[@]}" to-hf "$WORKDIR" "$HF_DIR" --force

step "5/6 load it in transformers (PyTorch) and fill a mask in a sentence of the sample"
SENTENCE="Maria poured the hot water over [MASK] tea leaves and waited for three minutes."
echo "+ $PYTHON -c 'pipeline(\"fill-mask\", model=\"$HF_DIR\")(\"$SENTENCE\")'"
"$PYTHON" - "$HF_DIR" "$SENTENCE" <<'EOF'
import sys

import transformers
from transformers import pipeline

transformers.logging.set_verbosity_error()  # the load report lists the unused NSP head
transformers.utils.logging.disable_progress_bar()
hf_dir, sentence = sys.argv[1], sys.argv[2]
fill_mask = pipeline("fill-mask", model=hf_dir)
print(sentence)
for guess in fill_mask(sentence, top_k=5):
  print(f"  {guess['score']:.3f}  {guess['token_str']}")
EOF

step "6/6 learning curves"
run "$PYTHON" "$REPO_ROOT/tools/plot_metrics.py" "$WORKDIR/metrics.jsonl" "$PNG"

CHECKPOINTS="$WORKDIR/checkpoints"
STEPS=""
for dir in "$CHECKPOINTS"/*/; do
  if [[ -d "$dir" ]]; then STEPS+="$(basename "$dir") "; fi
done
echo
echo "== done in $((SECONDS - START)) s. Where everything went:"
printf '  %-22s %s\n' \
  "vocab" "$VOCAB" \
  "phase-1 data (128)" "$DATA_128" \
  "phase-2 data (512)" "$DATA_512" \
  "orbax checkpoints" "$CHECKPOINTS (steps: ${STEPS% })" \
  "metrics" "$WORKDIR/metrics.jsonl" \
  "TensorBoard" "$WORKDIR/tensorboard  (tensorboard --logdir $WORKDIR/tensorboard)" \
  "Hugging Face model" "$HF_DIR" \
  "learning curves" "$PNG"
