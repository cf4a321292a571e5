#!/usr/bin/env bash
# The whole path on a laptop CPU in a few minutes, on the sample corpus embedded in the package:
#   vocab -> phase-1 (length 128) and phase-2 (length 512) data -> pretrain a tiny BERT through
#   both phases (orbax checkpoints) -> held-out MLM accuracy against the most-frequent-token
#   baseline -> convert to Hugging Face -> fill-mask in transformers -> learning-curve PNG.
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
HF_DIR="$WORKDIR/hf"
PNG="$WORKDIR/learning_curves.png"
CONFIG="$REPO_ROOT/configs/tiny_cpu.py"
START=$SECONDS

# The numbers (vocab size, lengths, predictions, steps) come from the config, so these steps
# build exactly what `bert-jax pretrain --config configs/tiny_cpu.py` would build by itself.
read -r VOCAB_SIZE DUPE EVAL_FRACTION CASING MASKING PHASES < <("$PYTHON" - "$CONFIG" <<'EOF'
import sys

from bert_jax.training.phases import make_phases
from bert_jax.pretraining.run_config import resolve_config

cfg = resolve_config(sys.argv[1], [])
phases = ",".join(f"{p.seq_len}:{p.max_predictions}:{p.end_step - p.start_step}"
                  for p in make_phases(cfg))
casing = "--lower-case" if cfg.data.lower_case else "--no-lower-case"
masking = "dynamic" if cfg.data.dynamic_masking else "static"
print(cfg.data.vocab_size, cfg.data.dupe_factor, cfg.data.eval_fraction, casing, masking, phases)
EOF
)
MASKING_FLAGS=()
if [[ "$MASKING" == "dynamic" ]]; then MASKING_FLAGS=(--no-static-masking); fi
IFS=, read -r -a PHASE_SPECS <<<"$PHASES"

step "1/7 train a ${VOCAB_SIZE}-entry WordPiece vocab on the embedded English sample"
if [[ -s "$VOCAB" ]]; then
  echo "(exists: $VOCAB)"
else
  run "${BERT_JAX[@]}" train-vocab --input sample:en --vocab-size "$VOCAB_SIZE" "$CASING" \
    --output "$VOCAB"
fi

step "2/7 create MLM+NSP instances for each phase (length:predictions:steps ${PHASES//,/ })"
DATA_FLAGS=()
DATA_DIRS=()
for i in "${!PHASE_SPECS[@]}"; do
  IFS=: read -r seq_len predictions _ <<<"${PHASE_SPECS[$i]}"
  out="$WORKDIR/data/phase_$i"
  DATA_DIRS+=("$out")
  DATA_FLAGS+=("--config.phases.$i.data=$out")
  if [[ -f "$out/manifest.json" ]]; then
    echo "(exists: $out)"
    continue
  fi
  run "${BERT_JAX[@]}" create-data --input sample:en --vocab "$VOCAB" --output "$out" \
    --max-seq-length "$seq_len" --max-predictions-per-seq "$predictions" \
    --dupe-factor "$DUPE" --eval-fraction "$EVAL_FRACTION" "${MASKING_FLAGS[@]}" --no-progress
done

step "3/7 pretrain a small BERT through every phase, checkpointing with orbax"
run "${BERT_JAX[@]}" pretrain --config "$CONFIG" --workdir "$WORKDIR" \
  --config.data.vocab="$VOCAB" "${DATA_FLAGS[@]}"

step "4/7 did it learn? held-out masked-LM accuracy against always guessing the commonest token"
"$PYTHON" - "$WORKDIR/metrics.jsonl" "$VOCAB" "${DATA_DIRS[@]}" <<'EOF'
import collections
import json
import sys

import numpy as np

from bert_jax.data import read_instances
from bert_jax.data.records import read_manifest

metrics, vocab_path, data_dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
tokens = open(vocab_path, encoding="utf-8").read().split("\n")
rows = [json.loads(line) for line in open(metrics, encoding="utf-8") if line.strip()]


def maskable_ids(instance, specials):
  ids = instance["input_ids"].copy()
  ids[instance["masked_lm_positions"]] = instance["masked_lm_ids"]  # the original text
  return ids[~np.isin(ids, specials)]


for phase, data_dir in enumerate(data_dirs):
  evals = [r for r in rows if r.get("split") == "eval" and r["phase"] == phase]
  if not evals:
    continue
  last = evals[-1]
  vocab = read_manifest(data_dir)["vocab"]
  specials = [vocab[k] for k in ("pad_id", "cls_id", "sep_id")]
  counts = collections.Counter()
  for instance in read_instances(data_dir, "train"):
    counts.update(maskable_ids(instance, specials).tolist())
  commonest = counts.most_common(1)[0][0]
  # Masked positions are drawn uniformly from these tokens, so always answering `commonest`
  # scores its share of them, on the same held-out sequences the eval row measured.
  held_out = [maskable_ids(inst, specials) for _, inst in
              zip(range(int(last["eval_sequences"])), read_instances(data_dir, "eval"))]
  baseline = float(np.mean(np.concatenate(held_out) == commonest))
  print(f"phase {phase + 1} (seq {last['seq_len']}, step {last['step']}): MLM accuracy "
        f"{last['mlm_accuracy']:.3f} vs {baseline:.3f} for always predicting the most frequent "
        f"token ({tokens[commonest]!r}), on {last['eval_sequences']} held-out sequences")
EOF

step "5/7 convert the newest checkpoint to a Hugging Face directory (safetensors)"
run "${CONVERT[@]}" to-hf "$WORKDIR" "$HF_DIR" --force

step "6/7 load it in transformers (PyTorch) and fill a mask in a sentence of the sample"
echo "(loading transformers and PyTorch: 10-20 s)"
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

step "7/7 learning curves"
run "$PYTHON" "$REPO_ROOT/tools/plot_metrics.py" "$WORKDIR/metrics.jsonl" "$PNG"

CHECKPOINTS="$WORKDIR/checkpoints"
STEPS=""
for dir in "$CHECKPOINTS"/*/; do
  if [[ -d "$dir" ]]; then STEPS+="$(basename "$dir") "; fi
done
echo
echo "== done in $((SECONDS - START)) s. Where everything went:"
printf '  %-22s %s\n' "vocab" "$VOCAB"
for i in "${!DATA_DIRS[@]}"; do
  printf '  %-22s %s\n' "phase-$((i + 1)) data (${PHASE_SPECS[$i]%%:*})" "${DATA_DIRS[$i]}"
done
printf '  %-22s %s\n' \
  "orbax checkpoints" "$CHECKPOINTS (steps: ${STEPS% })" \
  "metrics" "$WORKDIR/metrics.jsonl" \
  "TensorBoard" "$WORKDIR/tensorboard  (tensorboard --logdir $WORKDIR/tensorboard)" \
  "Hugging Face model" "$HF_DIR" \
  "learning curves" "$PNG"
