"""`bert-jax <subcommand>`: a thin dispatcher; each subcommand's logic lives in its module."""

from __future__ import annotations

import importlib
import sys

from bert_jax.devices import hostmem

# subcommand -> (module, help line). Modules are imported lazily so `--help` is instant.
SUBCOMMANDS = {
    "train-vocab": ("bert_jax.vocab", "train a WordPiece vocab.txt with sentencepiece"),
    "create-data": ("bert_jax.data.create", "create pretraining data: MLM+NSP pairs or MLM rows"),
    "pretrain": ("bert_jax.pretraining.train", "pretrain BERT from an ml_collections config"),
    "plan": ("bert_jax.pretraining.plan",
             "compile the train step for a TPU topology: memory, FLOPs, time"),
    "convert": ("bert_jax.convert", "convert checkpoints: orbax <-> Hugging Face, Google TF1"),
    "finetune": ("bert_jax.finetune.__main__", "fine-tune a BERT on a downstream task"),
}
TRAINING = ("pretrain", "finetune")  # run with huge-page malloc (bert_jax.devices.hostmem)


def usage() -> str:
  lines = ["usage: bert-jax <subcommand> [--help] ...", "", "subcommands:"]
  lines += [f"  {name:<12} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  if argv is None and sys.argv[1:2] and sys.argv[1] in TRAINING:  # the command, not a caller
    hostmem.reexec_with_huge_pages()
  if argv is None and sys.argv[1:2] == ["plan"]:
    hostmem.reexec_with_deep_stacks()
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in SUBCOMMANDS:
    print(f"error: unknown subcommand {name!r}; expected one of {', '.join(SUBCOMMANDS)}",
          file=sys.stderr)
    return 2
  module = importlib.import_module(SUBCOMMANDS[name][0])
  return int(module.main(rest) or 0)


if __name__ == "__main__":
  sys.exit(main())
