"""A fine-tuning run's settings, typed and frozen: built once from the command line (the parser
in __main__.py holds every flag's default and help), its task-dependent defaults resolved there,
then read by the trainer and the tasks and never written (what a task derives from its data,
QA's --max-answer-length by language say, is the task's own).
"""

from __future__ import annotations

import argparse
import dataclasses

from bert_jax.errors import UserError


def positive(kind):
  """An argparse type: `kind` of the text, refused unless above zero (both commands' flags)."""
  def parse(text):
    value = kind(text)
    if value <= 0:
      raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value
  return parse


# --max-seq-length and --doc-stride when not given: QA's windows are longer.
DEFAULT_MAX_SEQ_LENGTH = {"qa": 384}
DEFAULT_QA_DOC_STRIDE = 128


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """One field per flag of `python -m bert_jax.finetune` (the flag's name with '_' for '-')."""
  # the run
  task: str
  init: str                        # a checkpoint, a Hugging Face BERT directory, or "random"
  preset: str                      # model size for --init random: a preset or a config.json
  vocab: str | None
  lower_case: str                  # auto | yes | no
  train_file: str
  validation_file: str
  context_file: str | None         # the homework layout's paragraph list
  output_dir: str
  overwrite_output_dir: bool
  export_hf: str | None
  # optimisation
  epochs: int
  batch_size: int                  # rows per micro-step
  eval_batch_size: int
  learning_rate: float
  warmup_ratio: float
  lr_schedule: str                 # linear | cosine
  weight_decay: float
  max_grad_norm: float
  gradient_accumulation: int
  seed: int
  # shapes, devices and speed
  max_seq_length: int              # resolved: 128, 384 for qa
  doc_stride: int | None           # resolved for qa (128); token tagging: half a window
  smallest_bucket: int             # at most max_seq_length
  packing: bool | None             # None: the task's default (on for classification)
  mesh: str
  compilation_cache: str
  dtype: str                       # auto | float32 | bfloat16
  attention: str                   # auto | xla | pallas | splash | cudnn
  remat: str                       # off | dots | on
  eval_every: int
  max_train_rows: int | None
  quiet: bool
  # classification
  text_column: str | None
  text_pair_column: str | None
  label_column: str | None
  regression: bool | None
  # qa
  max_query_length: int
  max_answer_length: int | None    # None: by the contexts' language (the task decides)
  n_best: int
  version_2_with_negative: bool
  null_score_diff_threshold: float

  @classmethod
  def from_args(cls, args: argparse.Namespace) -> FinetuneConfig:
    """The config of parsed flags, defaults that depend on the task resolved and the values
    that argparse cannot check checked (UserError naming the flag)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    if values["max_seq_length"] is None:
      values["max_seq_length"] = DEFAULT_MAX_SEQ_LENGTH.get(values["task"], 128)
    if values["doc_stride"] is None and values["task"] == "qa":
      values["doc_stride"] = DEFAULT_QA_DOC_STRIDE
    if not 0.0 <= values["warmup_ratio"] < 1.0:
      raise UserError(f"--warmup-ratio {values['warmup_ratio']}: expected a value in [0, 1)")
    values["smallest_bucket"] = min(values["smallest_bucket"], values["max_seq_length"])
    return cls(**values)
