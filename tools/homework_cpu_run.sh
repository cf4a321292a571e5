#!/usr/bin/env bash
# The Chinese reading-comprehension homework end to end on a CPU, pretrained against random:
# CMRC 2018 in the homework's layout (tools/make_homework_data.py: 1,200 training questions
# from CMRC 2018 dev, 300 held-out questions from CMRC 2018 trial, whose paragraphs -- the
# relevant ones and the three distractors -- no training question sees), a tiny BERT
# (configs/tiny_cpu.py:zh, 2 layers x 128) pretrained here on the training paragraphs with the
# bert-base-chinese vocab, then for each init (that model, and random weights of the same
# size): --task choice, --task qa, and the two-stage `predict --choice-model` on valid.json,
# which prints selection accuracy and the pipeline's EM/F1 on the held-out questions.
#
#   tools/homework_cpu_run.sh [OUT_DIR]        (default /tmp/homework_cpu; run from the repo)
#
# Knobs (environment): DATA (../shared/data), PRETRAIN_STEPS (800), EPOCHS (2), TRAIN_Q (1200),
# VALID_Q (300). About 12 minutes on 2 CPU cores. The last lines are one JSON summary per init.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/homework_cpu}
DATA=${DATA:-../shared/data}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-800}
EPOCHS=${EPOCHS:-2}
VOCAB=$(realpath "$DATA/vocab/bert-base-chinese-vocab.txt")
mkdir -p "$OUT"
T0=$SECONDS
stamp() { echo "[$((SECONDS - T0)) s] $*" >&2; }

stamp "homework layout from CMRC 2018"
python tools/make_homework_data.py --train-source "$DATA/cmrc2018/cmrc2018_dev.json" \
  --valid-source "$DATA/cmrc2018/cmrc2018_trial.json" --output "$OUT/data" \
  --train-questions "${TRAIN_Q:-1200}" --valid-questions "${VALID_Q:-300}"
D=$OUT/data

stamp "pretraining configs/tiny_cpu.py:zh for $PRETRAIN_STEPS steps on the training paragraphs"
bert-jax pretrain --config configs/tiny_cpu.py:zh --workdir "$OUT/pretrain" \
  --config.data.input="[\"$D/corpus.txt\"]" --config.data.vocab="$VOCAB" \
  --config.model.overrides.vocab_size=21128 --config.total_steps="$PRETRAIN_STEPS" \
  --config.eval_every=200 --config.log_every=100

common=(--context-file "$D/context.json" --train-file "$D/train.json"
        --validation-file "$D/valid.json" --epochs "$EPOCHS" --learning-rate 5e-4
        --warmup-ratio 0.1 --max-seq-length 256 --quiet --dtype float32
        --overwrite-output-dir)
for init in pretrained random; do
  if [ "$init" = pretrained ]; then
    from=(--init "$OUT/pretrain")
  else  # the same size, random weights (vocab_size from --vocab)
    from=(--init random --preset tiny --vocab "$VOCAB")
  fi
  stamp "$init: --task choice"
  python -m bert_jax.finetune --task choice "${from[@]}" "${common[@]}" --batch-size 8 \
    --output-dir "$OUT/$init/choice"
  stamp "$init: --task qa"
  python -m bert_jax.finetune --task qa "${from[@]}" "${common[@]}" --batch-size 16 \
    --doc-stride 128 --output-dir "$OUT/$init/qa"
  stamp "$init: predict --choice-model on valid.json (held-out paragraphs)"
  python -m bert_jax.finetune predict --model "$OUT/$init/qa" \
    --choice-model "$OUT/$init/choice" --test-file "$D/valid.json" \
    --context-file "$D/context.json" --output "$OUT/$init/valid_predictions.csv" \
    | tail -n 1 > "$OUT/$init/pipeline.json"
  python tools/plot_metrics.py "$OUT/$init/choice" >/dev/null
  python tools/plot_metrics.py "$OUT/$init/qa" >/dev/null
done
stamp "done"
for init in pretrained random; do
  python - "$OUT/$init" "$init" <<'EOF'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
choice = json.loads((d / "choice" / "metrics.json").read_text())
qa = json.loads((d / "qa" / "metrics.json").read_text())
print(json.dumps({"init": sys.argv[2], "choice_accuracy": round(choice["accuracy"], 4),
                  "qa_gold_paragraph_em": round(qa["exact_match"], 2),
                  "qa_gold_paragraph_f1": round(qa["f1"], 2),
                  "pipeline": json.loads((d / "pipeline.json").read_text())}))
EOF
done
