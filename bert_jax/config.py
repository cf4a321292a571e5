"""BertConfig with Hugging Face config.json field names, presets, and config.json I/O."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from bert_jax.errors import UserError

HF_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "max_position_embeddings", "type_vocab_size", "initializer_range", "layer_norm_eps",
    "pad_token_id")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture hyper-parameters (HF names) plus how to run it (dtype, remat)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  # Not architecture: how the model runs. Never written to config.json.
  dtype: str = "float32"        # compute dtype, e.g. "bfloat16"
  param_dtype: str = "float32"  # master weights
  remat: bool | str = False     # recompute encoder layers in the backward pass: True (all of
                                # each), "dots" (all but its weight matmuls' outputs) or False
  attention: str = "auto"       # auto | xla | pallas | splash | cudnn (bert_jax.modeling.attention)

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise UserError(f"hidden_size {self.hidden_size} is not divisible by "
                      f"num_attention_heads {self.num_attention_heads}")
    if self.attention not in ATTENTIONS:
      raise UserError(f"attention {self.attention!r} is not supported; expected one of "
                      f"{', '.join(ATTENTIONS)}")
    if self.remat not in REMATS:
      raise UserError(f"remat {self.remat!r} is not supported; expected True, False or 'dots'")
    if self.hidden_act not in ACTIVATIONS:
      raise UserError(f"hidden_act {self.hidden_act!r} is not supported; expected one of "
                      f"{', '.join(ACTIVATIONS)}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def replace(self, **changes: Any) -> "BertConfig":
    return dataclasses.replace(self, **changes)

  def to_hf_dict(self) -> dict[str, Any]:
    return {name: getattr(self, name) for name in HF_FIELDS}

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> "BertConfig":
    if d.get("model_type", "bert") != "bert":
      raise UserError(f"{source}: model_type is {d['model_type']!r}; expected 'bert'")
    missing = [f for f in ("vocab_size", "hidden_size", "num_hidden_layers",
                           "num_attention_heads", "intermediate_size") if f not in d]
    if missing:
      raise UserError(f"{source}: missing field(s) {', '.join(missing)}")
    kwargs = {f: d[f] for f in HF_FIELDS if f in d and d[f] is not None}
    try:
      return cls(**kwargs)
    except TypeError as e:
      raise UserError(f"{source}: {e}") from None


# Least recompute first: what model.remat auto tries in turn (training.steps.Pretraining).
REMATS = (False, "dots", True)
# auto: fused where the platform has a kernel (modeling.attention.choose); xla: never fused.
ATTENTIONS = ("auto", "xla", "pallas", "splash", "cudnn")
# gelu is BERT's exact erf GELU; gelu_new/gelu_pytorch_tanh the tanh approximation.
ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "silu", "tanh")


def read_config_json(path: str) -> BertConfig:
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path}: no such file; expected a BERT config.json") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise UserError(f"{path}: expected a JSON object")
  return BertConfig.from_hf_dict(d, source=path)


def write_config_json(config: BertConfig, path: str | os.PathLike,
                      architectures: tuple[str, ...] = ("BertForPreTraining",)) -> None:
  """config.json as transformers writes it, atomically, to any local or gs:// path."""
  from bert_jax.storage.fileio import write_json_atomic
  write_json_atomic(path, {"architectures": list(architectures), "model_type": "bert",
                           **config.to_hf_dict(), "position_embedding_type": "absolute",
                           "torch_dtype": "float32", "use_cache": True})


def find_config(path: str | os.PathLike, levels: int = 2) -> BertConfig | None:
  """The BertConfig of a checkpoint, workdir or HF dir (local or gs://) from the config.json
  in it or up to `levels` parents above (no weights read), or None when there is none."""
  from bert_jax.storage.fileio import local_copy, self_and_parents
  for d in self_and_parents(path, levels):
    if (d / "config.json").is_file():
      return read_config_json(local_copy(str(d / "config.json")))
  return None


def _size(layers: int, hidden: int, vocab_size: int = 30522) -> BertConfig:
  return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=hidden // 64, intermediate_size=4 * hidden)


# Google's 24 small BERTs (bert/README "BERT-Tiny ... BERT-Base"), named L-{layers}_H-{hidden}.
PRESETS: dict[str, BertConfig] = {
    f"L-{layers}_H-{hidden}": _size(layers, hidden)
    for layers in (2, 4, 6, 8, 10, 12) for hidden in (128, 256, 512, 768)
}
PRESETS.update({
    "tiny": PRESETS["L-2_H-128"],
    "mini": PRESETS["L-4_H-256"],
    "small": PRESETS["L-4_H-512"],
    "medium": PRESETS["L-8_H-512"],
    "base": PRESETS["L-12_H-768"],
    "large": BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096),
    "chinese-base": _size(12, 768, vocab_size=21128),
})


def get_preset(name: str, **overrides: Any) -> BertConfig:
  if name not in PRESETS:
    raise UserError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
  return PRESETS[name].replace(**overrides)
