"""Hugging Face's side of loading: the name mapping, HF directories (safetensors) both ways,
Google's TF1 checkpoints (through the same mapping, tf1.py), `load_pretrained` and the
bert-jax-convert CLI. bert-jax's own checkpoints are checkpoint.py's.

The Flax parameter tree mirrors transformers' module names, so one generic rule maps any tree
whose top-level keys are HF module names ("bert", "cls", "classifier", "qa_outputs"):
path joined with ".", layer_N -> layer.N, Dense kernel -> weight (transposed; attention kernels
[E,N,H] / [N,H,E] flattened), LayerNorm scale -> weight, Embed embedding -> weight.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any

import numpy as np

from bert_jax.config import BertConfig, read_config_json, write_config_json
from bert_jax.errors import UserError, cli_entry
from bert_jax.storage.fileio import (check_writable, is_remote, new_directory, resolved,
                                     write_json_atomic)
from bert_jax.tokenizer import find_lower_case, find_vocab, write_tokenizer_files

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
FINETUNE_INFO = "finetune.json"  # beside a fine-tune's best/ params: its task and head
HF_HEAD_FIELDS = ("num_labels", "id2label", "label2id", "problem_type")  # of config.json


# ----------------------------------------------------------------------------- name mapping

def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flatten(dict(v), prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: dict[tuple, Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def hf_name(path: tuple[str, ...]) -> str:
  """Our param path -> the transformers state-dict key."""
  parts = []
  for k in path[:-1]:
    parts += ["layer", k[len("layer_"):]] if k.startswith("layer_") else [k]
  parts.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(path[-1],
                                                                                path[-1]))
  return ".".join(parts)


def _contracted_axes(path: tuple[str, ...]) -> int:
  """How many leading axes of a kernel are inputs: 2 for the attention output ([N,H,E])."""
  return 2 if path[-4:-1] == ("attention", "output", "dense") else 1


def to_hf_tensor(path: tuple[str, ...], x) -> np.ndarray:
  x = np.asarray(x, dtype=np.float32)
  if path[-1] == "kernel":
    n_in = _contracted_axes(path)
    x = x.reshape(int(np.prod(x.shape[:n_in])), -1).T
  elif path[-1] == "bias":
    x = x.reshape(-1)
  return np.ascontiguousarray(x)


def from_hf_tensor(path: tuple[str, ...], t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  t = np.asarray(t, dtype=np.float32)
  if path[-1] == "kernel":
    n_in = _contracted_axes(path)
    expected = (int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in])))
    if t.shape != expected:
      raise ValueError(f"has shape {tuple(t.shape)}; expected {expected}")
    return np.ascontiguousarray(t.T.reshape(shape))
  if int(np.prod(t.shape)) != int(np.prod(shape)) or (t.ndim == len(shape) and t.shape != shape):
    raise ValueError(f"has shape {tuple(t.shape)}; expected {tuple(shape)}")
  return np.ascontiguousarray(t.reshape(shape))


def params_to_hf(params: dict) -> dict[str, np.ndarray]:
  """Any params tree with HF module names at the top -> transformers state dict (float32)."""
  return {hf_name(p): to_hf_tensor(p, x) for p, x in _flatten(params).items()}


def _normalise_hf_keys(state_dict: dict[str, Any], wanted: set[str]) -> dict[str, Any]:
  """Old TF-era names (gamma/beta) and bare BertModel checkpoints (no "bert." prefix)."""
  out = {}
  for k, v in state_dict.items():
    k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if k not in wanted and "bert." + k in wanted:
      k = "bert." + k
    out[k] = v
  return out


def params_from_hf(state_dict: dict[str, Any], template: dict, source: str = "state dict"
                   ) -> tuple[dict, list[str], list[str]]:
  """Fills `template` (a params tree, or its shapes) from an HF state dict.

  Returns (params, missing HF keys, unused HF keys); a missing key keeps the template's value,
  or is left out when the template holds only its shape.
  """
  import jax
  flat = _flatten(template)
  names = {hf_name(p): p for p in flat}
  state_dict = _normalise_hf_keys(state_dict, set(names))
  out, missing = {}, []
  for name, path in names.items():
    if name not in state_dict:
      missing.append(name)
      if not isinstance(flat[path], jax.ShapeDtypeStruct):
        out[path] = np.asarray(flat[path], dtype=np.float32)
      continue
    try:
      out[path] = from_hf_tensor(path, state_dict[name], tuple(flat[path].shape))
    except ValueError as e:
      raise UserError(f"{source}: tensor {name} {e} (does config.json match the weights?)"
                      ) from None
  ignorable = ("position_ids", "decoder.weight", "decoder.bias")  # buffers, tied copies
  unused = sorted(k for k in state_dict if k not in names and not k.endswith(ignorable))
  return _unflatten(out), missing, unused


# ----------------------------------------------------------------------------- model init

def init_pretraining_params(config: BertConfig, seed: int = 0, shapes_only: bool = False
                            ) -> dict:
  """Freshly initialised float32 BertForPreTraining params (a plain pytree), or with
  `shapes_only` their jax.ShapeDtypeStructs (nothing compiled or computed)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from bert_jax.modeling.heads import BertForPreTraining
  ids = jnp.zeros((1, 8), jnp.int32)
  init = BertForPreTraining(config).init
  if shapes_only:
    return nn.unbox(jax.eval_shape(init, jax.random.key(seed), ids)["params"])
  variables = jax.jit(init)(jax.random.key(seed), ids)
  return jax.tree_util.tree_map(np.asarray, nn.unbox(variables["params"]))


# ----------------------------------------------------------------------------- HF directories

def is_hf_dir(path: str | os.PathLike) -> bool:
  p = pathlib.Path(path)
  return (p / "config.json").is_file() and any((p / f).is_file() for f in HF_WEIGHT_FILES)


def read_hf_state_dict(hf_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
  """Weights of an HF directory as float32 numpy arrays, and the file they came from."""
  d = pathlib.Path(hf_dir)
  index = d / "model.safetensors.index.json"
  if (d / "model.safetensors").is_file():
    files = [d / "model.safetensors"]
  elif index.is_file():
    with open(index, encoding="utf-8") as f:
      files = [d / name for name in sorted(set(json.load(f)["weight_map"].values()))]
  elif (d / "pytorch_model.bin").is_file():
    return _read_torch_bin(d / "pytorch_model.bin"), str(d / "pytorch_model.bin")
  else:
    raise UserError(f"{d}: no model.safetensors or pytorch_model.bin; expected a Hugging Face "
                    "BERT directory")
  from safetensors import safe_open
  state = {}
  for file in files:
    try:
      with safe_open(str(file), framework="flax") as f:  # flax handles bfloat16 tensors
        for k in f.keys():
          state[k] = np.asarray(f.get_tensor(k), dtype=np.float32)
    except Exception as e:  # safetensors raises its own error types for damaged files
      raise UserError(f"{file}: cannot read safetensors ({e})") from None
  return state, str(files[0])


def _read_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise UserError(f"{path}: reading .bin weights needs torch (pip install 'bert-jax[hf]'), "
                    "or convert the directory to safetensors") from None
  try:
    state = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickle code
  except Exception as e:
    raise UserError(f"{path}: cannot load with torch's weights-only loader ({e})") from None
  return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "float")}


def load_pretrained(path: str | os.PathLike, seed: int = 0, verbose: bool = True,
                    fresh_heads: bool = True) -> tuple[BertConfig, dict]:
  """(config, params) from a Hugging Face BERT directory, a Google TF1 BERT directory
  (bert_config.json + bert_model.ckpt.*, tf1.py) or a bert-jax checkpoint.

  params is {"bert": ..., "cls": ...}; heads the source lacks (a bare BertModel) are freshly
  initialised from `seed` and listed on stderr, or, with fresh_heads=False (for a merge into
  a model's own fresh params, state.merge_params), left out: no init is compiled or run.
  """
  p = resolved(path)  # a bert-jax checkpoint may be on gs://; HF and TF1 directories are local
  if not p.exists():
    raise UserError(f"{path}: no such file or directory")
  if not is_remote(path) and is_hf_dir(p):
    config, params, _ = load_hf(p, seed=seed, verbose=verbose, fresh_heads=fresh_heads)
    return config, params
  if not is_remote(path) and (p / "bert_config.json").is_file():
    config, params, _ = load_tf1(p, seed=seed, verbose=verbose, fresh_heads=fresh_heads)
    return config, params
  from bert_jax.storage.checkpoint import load_checkpoint  # orbax, only for bert-jax checkpoints
  config, params, _ = load_checkpoint(p)
  return config, params


def load_hf(hf_dir: str | os.PathLike, seed: int = 0, verbose: bool = True,
            fresh_heads: bool = True) -> tuple[BertConfig, dict, list[str]]:
  """An HF BERT dir -> (config, params, HF keys that were missing and initialised)."""
  d = pathlib.Path(hf_dir)
  if not (d / "config.json").is_file():
    raise UserError(f"{d}: no config.json; expected a Hugging Face BERT directory")
  config = read_config_json(str(d / "config.json"))
  state, source = read_hf_state_dict(d)
  return _from_state_dict(config, state, source, seed, verbose, fresh_heads)


def load_tf1(tf_dir: str | os.PathLike, seed: int = 0, verbose: bool = True,
             fresh_heads: bool = True) -> tuple[BertConfig, dict, list[str]]:
  """A Google TF1 BERT dir (bert_model.ckpt.* + bert_config.json) -> (config, params, HF keys
  that were missing). Its "gelu" is google-research/bert's tanh approximation: read as
  gelu_new, so the outputs are the TF model's."""
  from bert_jax import tf1
  d = pathlib.Path(tf_dir)
  config = read_config_json(str(d / "bert_config.json"))
  if config.hidden_act == "gelu":
    config = config.replace(hidden_act="gelu_new")
  prefix = tf1.find_prefix(d)
  if prefix is None:
    raise UserError(f"{d}: no TF checkpoint (a `checkpoint` file or one *.ckpt.index); "
                    "expected bert_model.ckpt.index and .data-* beside bert_config.json")
  tensors = tf1.read_tensors(prefix, tf1.is_model_variable)
  state = dict(tf1.tf_to_hf(name, x) for name, x in tensors.items())
  return _from_state_dict(config, state, prefix + ".index", seed, verbose, fresh_heads)


def _from_state_dict(config: BertConfig, state: dict, source: str, seed: int, verbose: bool,
                     fresh_heads: bool) -> tuple[BertConfig, dict, list[str]]:
  template = init_pretraining_params(config, seed, shapes_only=not fresh_heads)
  params, missing, unused = params_from_hf(state, template, source)
  encoder_missing = [k for k in missing if k.startswith("bert.") and "pooler" not in k]
  if encoder_missing:
    raise UserError(f"{source}: tensor {encoder_missing[0]} is missing "
                    f"({len(encoder_missing)} encoder tensors in all); not a BERT checkpoint?")
  if verbose and missing and fresh_heads:
    print(f"initialised {len(missing)} tensors absent from {source}: "
          f"{_summarise(missing)}", file=sys.stderr)
  if verbose and unused:
    print(f"ignored {len(unused)} tensors of {source}: {_summarise(unused)}", file=sys.stderr)
  return config, params, missing


def _summarise(names: list[str], limit: int = 6) -> str:
  return ", ".join(names[:limit]) + (f", ... (+{len(names) - limit})" if len(names) > limit else "")


# ----------------------------------------------------------------------------- writing HF

def write_hf_dir(hf_dir: str | os.PathLike, config: BertConfig, params: dict, *,
                 vocab_path: str | None, lower_case: bool | None,
                 architectures: tuple[str, ...] = ("BertForPreTraining",),
                 extra_config: dict | None = None, force: bool = False) -> None:
  """A transformers directory (weights in float32, tokenizer files), written atomically."""
  from safetensors.numpy import save_file
  with new_directory(hf_dir, replace=force) as tmp:
    save_file(params_to_hf(params), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write_config_json(config, str(tmp / "config.json"), architectures=tuple(architectures))
    if extra_config:
      cfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
      write_json_atomic(tmp / "config.json", {**cfg, **extra_config})
    if vocab_path:
      write_tokenizer_files(tmp, vocab_path, bool(lower_case), config.max_position_embeddings)


# ----------------------------------------------------------------------------- CLI

def from_hf(hf_dir: str, ckpt_dir: str, seed: int = 0) -> list[str]:
  from bert_jax.storage.checkpoint import write_checkpoint
  config, params, missing = load_hf(hf_dir, seed=seed)
  vocab = find_vocab(hf_dir, levels=0)
  if vocab is None:
    print(f"warning: {hf_dir}: no vocab.txt or tokenizer.json; the checkpoint has no vocabulary",
          file=sys.stderr)
  write_checkpoint(ckpt_dir, config, params, vocab, find_lower_case(hf_dir, vocab))
  return missing


def from_tf(tf_dir: str, ckpt_dir: str, seed: int = 0) -> list[str]:
  from bert_jax.storage.checkpoint import write_checkpoint
  config, params, missing = load_tf1(tf_dir, seed=seed)
  vocab = find_vocab(tf_dir, levels=0)
  if vocab is None:
    print(f"warning: {tf_dir}: no vocab.txt; the checkpoint has no vocabulary", file=sys.stderr)
  write_checkpoint(ckpt_dir, config, params, vocab, find_lower_case(tf_dir, vocab))
  return missing


def to_tf(ckpt_dir: str, tf_dir: str) -> pathlib.Path:
  """A pretraining checkpoint -> bert_model.ckpt.* + bert_config.json (+ vocab.txt) as Google's
  releases lay them out."""
  import shutil

  from bert_jax import tf1
  from bert_jax.storage.checkpoint import load_checkpoint
  config, params, params_dir = load_checkpoint(ckpt_dir)
  if "cls" not in params:
    raise UserError(f"{params_dir}: has no pretraining heads (cls); expected a pretraining "
                    "checkpoint")
  if config.hidden_act not in ("gelu_new", "gelu_pytorch_tanh"):
    print(f"warning: {ckpt_dir}: hidden_act is {config.hidden_act!r}; google-research/bert's "
          "'gelu' is the tanh approximation, so TF will compute a slightly different model",
          file=sys.stderr)
  state = params_to_hf({"bert": params["bert"], "cls": params["cls"]})
  tensors = dict(tf1.hf_to_tf(k, v) for k, v in state.items())
  vocab = find_vocab(params_dir.parent)
  with new_directory(tf_dir) as tmp:
    tf1.write_tensors(tmp / "bert_model.ckpt", tensors)
    (tmp / "checkpoint").write_text('model_checkpoint_path: "bert_model.ckpt"\n'
                                    'all_model_checkpoint_paths: "bert_model.ckpt"\n')
    hf = config.to_hf_dict()
    tf_config = {k: hf[k] for k in ("attention_probs_dropout_prob", "hidden_act",
                                    "hidden_dropout_prob", "hidden_size", "initializer_range",
                                    "intermediate_size", "max_position_embeddings",
                                    "num_attention_heads", "num_hidden_layers",
                                    "type_vocab_size", "vocab_size")}
    if tf_config["hidden_act"] in ("gelu_new", "gelu_pytorch_tanh"):
      tf_config["hidden_act"] = "gelu"  # modeling.py's gelu is the tanh form
    write_json_atomic(tmp / "bert_config.json", tf_config)
    if vocab:
      shutil.copyfile(vocab, tmp / "vocab.txt")
  return params_dir


def to_hf(ckpt_dir: str, hf_dir: str, force: bool = False) -> None:
  from bert_jax.storage.checkpoint import load_checkpoint
  config, params, params_dir = load_checkpoint(ckpt_dir)
  vocab = find_vocab(params_dir.parent)
  if vocab is None:
    print(f"warning: {ckpt_dir}: no vocab.txt found; writing weights without tokenizer files",
          file=sys.stderr)
  lower_case = find_lower_case(params_dir.parent, vocab)
  finetuned = params_dir.parent / FINETUNE_INFO
  if finetuned.is_file():  # a fine-tune's best/: exported with its task head
    info = json.loads(finetuned.read_text(encoding="utf-8"))
    write_hf_dir(hf_dir, config, params, vocab_path=vocab, lower_case=lower_case,
                 architectures=(info["architecture"],), force=force,
                 extra_config={k: info[k] for k in HF_HEAD_FIELDS if k in info})
    return params_dir
  if "cls" not in params:
    raise UserError(f"{params_dir}: has no pretraining heads (cls) and no {FINETUNE_INFO}; "
                    "expected a pretraining checkpoint or a fine-tuning run's best/")
  write_hf_dir(hf_dir, config, {"bert": params["bert"], "cls": params["cls"]}, vocab_path=vocab,
               lower_case=lower_case, force=force)
  return params_dir


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="bert-jax-convert", description="Convert BERT checkpoints between bert-jax (orbax) "
      "and Hugging Face (safetensors) or Google's TF1 checkpoints.")
  sub = parser.add_subparsers(dest="command", required=True)
  for name, source, about in (
      ("from-tf", "tf_dir", "a Google TF1 BERT directory (bert_model.ckpt.index / .data-*, "
       "bert_config.json, vocab.txt) -> a bert-jax checkpoint"),
      ("from-hf", "hf_dir", "a Hugging Face BERT directory -> a bert-jax checkpoint")):
    p = sub.add_parser(name, help=about)
    p.add_argument("source", metavar=source)
    p.add_argument("ckpt_dir")
    p.add_argument("--seed", type=int, default=0, help="seed for heads the source lacks")
  p = sub.add_parser("to-tf", help="a bert-jax pretraining checkpoint or workdir -> a TF1 "
                     "directory as Google's releases (bert_model.ckpt.*, bert_config.json)")
  p.add_argument("ckpt_dir")
  p.add_argument("tf_dir")
  p = sub.add_parser("to-hf", help="a bert-jax checkpoint, pretraining workdir or fine-tuning "
                     "run's OUTPUT_DIR/best (with its task head) -> Hugging Face")
  p.add_argument("ckpt_dir")
  p.add_argument("hf_dir")
  p.add_argument("--force", action="store_true", help="replace an existing output directory")
  return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command in ("from-hf", "from-tf"):
    from bert_jax.tf1 import is_tf1_dir
    is_source, convert, expected = {
        "from-hf": (is_hf_dir, from_hf, "a Hugging Face BERT directory with config.json and "
                    "model.safetensors or pytorch_model.bin"),
        "from-tf": (is_tf1_dir, from_tf, "a TF1 BERT directory with bert_config.json and "
                    "bert_model.ckpt.index (+ .data-*)")}[args.command]
    source = args.source
    check_writable(args.ckpt_dir, f"{args.command} CKPT_DIR")
    if not is_source(source):
      raise UserError(f"{source}: expected {expected}")
    missing = convert(source, args.ckpt_dir, args.seed)
    print(f"wrote {args.ckpt_dir}" + (f" (initialised {len(missing)} absent tensors)"
                                       if missing else ""))
  elif args.command == "to-tf":
    check_writable(args.tf_dir, "to-tf TF_DIR")
    params_dir = to_tf(args.ckpt_dir, args.tf_dir)
    print(f"wrote {args.tf_dir} from {params_dir}")
  else:
    check_writable(args.hf_dir, "to-hf HF_DIR")
    params_dir = to_hf(args.ckpt_dir, args.hf_dir, args.force)
    print(f"wrote {args.hf_dir} from {params_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
