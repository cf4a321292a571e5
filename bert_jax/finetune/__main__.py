"""`python -m bert_jax.finetune` (also `bert-jax finetune`): the command line, read once into a
frozen run_config.FinetuneConfig; logic lives in trainer.py and tasks.py."""

from __future__ import annotations

import argparse
import json
import sys

from bert_jax.config import ATTENTIONS
from bert_jax.devices import hostmem, platforms, xla_cache
from bert_jax.errors import cli_entry
from bert_jax.finetune import TASK_NAMES
from bert_jax.finetune.run_config import positive


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m bert_jax.finetune",
      description="Fine-tune BERT for classification, token tagging, span QA or multiple "
                  "choice. Writes OUTPUT_DIR/metrics.json, predictions, and the best "
                  "checkpoint under OUTPUT_DIR/best. `predict --help`: predict with "
                  "OUTPUT_DIR/best on a file without labels.")
  p.add_argument("--task", required=True, choices=TASK_NAMES)
  p.add_argument("--init", required=True,
                 help="a bert-jax checkpoint, a Hugging Face BERT directory, or 'random'")
  p.add_argument("--preset", default="base",
                 help="model size for --init random: a bert_jax.config preset (tiny, mini, "
                      "small, medium, base, large, L-4_H-256, ...; default base) or a BERT "
                      "config.json of any size (vocab_size taken from --vocab)")
  p.add_argument("--vocab", help="vocab.txt (default: the one of --init; required with random)")
  p.add_argument("--lower-case", choices=("auto", "yes", "no"), default="auto",
                 help="lower-case text (auto: from the checkpoint's tokenizer_config or vocab)")
  p.add_argument("--train-file", required=True)
  p.add_argument("--validation-file", required=True)
  p.add_argument("--context-file", metavar="context.json",
                 help="choice / qa: the paragraph list that homework-layout files point into "
                      "(records of question, paragraphs [ids], relevant, answer {text, start})")
  p.add_argument("--output-dir", required=True)
  p.add_argument("--overwrite-output-dir", action="store_true",
                 help="replace the results of a finished run in --output-dir (refused "
                      "without it; an incomplete run's are replaced anyway)")
  p.add_argument("--export-hf", metavar="DIR",
                 help="also write the best model as a transformers directory (later: "
                      "bert-jax-convert to-hf OUTPUT_DIR/best DIR)")
  p.add_argument("--epochs", type=positive(int), default=3)
  p.add_argument("--batch-size", type=positive(int), default=32, help="rows per micro-step")
  p.add_argument("--eval-batch-size", type=positive(int), default=128)
  p.add_argument("--learning-rate", type=positive(float), default=2e-5)
  p.add_argument("--warmup-ratio", type=float, default=0.1)
  p.add_argument("--lr-schedule", choices=("linear", "cosine"), default="linear",
                 help="decay after the warmup: linear to 0 (transformers' default) or cosine")
  p.add_argument("--weight-decay", type=float, default=0.01)
  p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
  p.add_argument("--max-seq-length", type=positive(int), default=None,
                 help="default 128 (384 for qa)")
  p.add_argument("--doc-stride", type=positive(int), default=None,
                 help="tokens between the starts of the overlapping windows over a long "
                      "context (qa; default 128) or a sentence longer than --max-seq-length "
                      "(token; default half a window); each token is read from the window "
                      "where it has the most context")
  p.add_argument("--smallest-bucket", type=positive(int), default=16,
                 help="without packing, batches are padded to 16, 32, 64, ... up to "
                      "--max-seq-length")
  p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                 help="several short sequences per row, one compiled shape (default: on for "
                      "classification)")
  p.add_argument("--gradient-accumulation", type=positive(int), default=1,
                 help="micro-steps per optimizer update")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--mesh", default="", metavar="data=N,fsdp=M,tensor=K",
                 help="device mesh (default: all devices on data); fsdp shards parameters and "
                      "optimizer state, tensor splits heads and FFN. Several processes (SLURM, "
                      "TPU pods, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID) "
                      "each feed their share of every batch; process 0 writes")
  p.add_argument("--compilation-cache", default=xla_cache.default_dir(), metavar="DIR",
                 help="keep compiled steps here for reruns with the same shapes ('none': "
                      f"off; default ${xla_cache.ENV} or ~/.cache/bert-jax/xla/<CPU>)")
  p.add_argument("--eval-every", type=int, default=0,
                 help="evaluate every N optimizer updates (0: at the end of each epoch)")
  p.add_argument("--max-train-rows", type=positive(int), default=None,
                 help="use only the first N training records")
  p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                 help="compute dtype (weights and optimizer stay float32); auto: bfloat16 "
                      "where the device has bfloat16 matrix units (a TPU's MXU, NVIDIA Ampere "
                      "or newer, a CPU's AMX / AVX-512 BF16: about 2x faster fine-tuning), "
                      "float32 elsewhere")
  p.add_argument("--attention", choices=ATTENTIONS, default="auto",
                 help="attention path; auto: fused where the device has a kernel (the Pallas "
                      "kernel with attention dropout, else cuDNN or splash), xla: never fused")
  p.add_argument("--remat", choices=("off", "dots", "on"), default="off",
                 help="recompute each encoder layer in the backward pass (on: about a third "
                      "more FLOPs; dots: keeps the weight matmuls' outputs, about 5%% more) for "
                      "batches or lengths whose activations do not fit the device")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  g = p.add_argument_group("classification")
  g.add_argument("--text-column", help="name or 0-based index (default: sentence/text/...)")
  g.add_argument("--text-pair-column", help="second text (default: sentence2/hypothesis/...)")
  g.add_argument("--label-column", help="default: label/labels/gold_label/...")
  g.add_argument("--regression", action=argparse.BooleanOptionalAction, default=None,
                 help="one real-valued output, MSE loss (default: when labels are non-integer "
                      "numbers)")
  g = p.add_argument_group("qa")
  g.add_argument("--max-query-length", type=positive(int), default=64)
  g.add_argument("--max-answer-length", type=positive(int), default=None,
                 help="in tokens, a Chinese character being one (default: 30; 50 for Chinese)")
  g.add_argument("--n-best", type=positive(int), default=20)
  g.add_argument("--version-2-with-negative", action="store_true",
                 help="SQuAD 2.0: questions may have no answer")
  g.add_argument("--null-score-diff-threshold", type=float, default=0.0)
  return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["predict"]:  # `predict ...`: a fine-tuned model on a file without labels
    from bert_jax.finetune import predict
    platforms.check_install("finetune")
    return predict.main(argv[1:])
  args = build_parser().parse_args(argv)
  platforms.check_install("finetune")
  from bert_jax.finetune.outputs import EXIT_STOPPED, INCOMPLETE
  from bert_jax.finetune.run_config import FinetuneConfig
  from bert_jax.finetune.trainer import finetune
  best = finetune(FinetuneConfig.from_args(args))
  shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in best.items()}
  print(json.dumps(shown))
  return EXIT_STOPPED if best["status"] == INCOMPLETE else 0


if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()
  sys.exit(main())
