"""Checkpoints both ways between bert-jax (orbax) and Hugging Face (safetensors), and loading.

The Flax parameter tree mirrors transformers' module names, so one generic rule maps any tree
whose top-level keys are HF module names ("bert", "cls", "classifier", "qa_outputs"):
path joined with ".", layer_N -> layer.N, Dense kernel -> weight (transposed; attention kernels
[E,N,H] / [N,H,E] flattened), LayerNorm scale -> weight, Embed embedding -> weight.

A bert-jax checkpoint is a directory holding `params/` (an orbax StandardCheckpointer item of the
float32 params), with config.json and vocab.txt in it or up to two parents above (a pretraining
workdir keeps them at its top and checkpoints under checkpoints/<step>/params).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any

import numpy as np
from etils import epath

from bert_jax.config import BertConfig, read_config_json, write_config_json
from bert_jax.errors import UserError, cli_entry, drop_closed_loop_noise
from bert_jax.fileio import check_writable, follow_umask, is_remote, local_copy, scratch_dir, \
  write_json_atomic

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


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
  """Fills `template` (a params tree or its shapes) from an HF state dict.

  Returns (params, missing HF keys whose template values were kept, unused HF keys).
  """
  flat = _flatten(template)
  names = {hf_name(p): p for p in flat}
  state_dict = _normalise_hf_keys(state_dict, set(names))
  out, missing = {}, []
  for name, path in names.items():
    if name not in state_dict:
      missing.append(name)
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

def init_pretraining_params(config: BertConfig, seed: int = 0) -> dict:
  """Freshly initialised float32 BertForPreTraining params (a plain pytree)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from bert_jax.heads import BertForPreTraining
  ids = jnp.zeros((1, 8), jnp.int32)
  variables = jax.jit(BertForPreTraining(config).init)(jax.random.key(seed), ids)
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


def vocab_from_tokenizer_json(path: pathlib.Path) -> list[str]:
  with open(path, encoding="utf-8") as f:
    model = json.load(f).get("model", {})
  vocab = model.get("vocab")
  if model.get("type") != "WordPiece" or not isinstance(vocab, dict):
    raise UserError(f"{path}: expected a WordPiece tokenizer with a vocab")
  return [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def find_vocab(path: str | os.PathLike, levels: int = 2) -> str | None:
  """vocab.txt of a checkpoint or HF dir (written from tokenizer.json if only that exists),
  as a local file (a gs:// one, or one written from tokenizer.json, in fileio.scratch_dir())."""
  for d in _self_and_parents(path, levels):
    if (d / "vocab.txt").is_file():
      return local_copy(str(d / "vocab.txt"))
  for d in _self_and_parents(path, levels):
    if (d / "tokenizer.json").is_file():
      tokens = vocab_from_tokenizer_json(d / "tokenizer.json")
      out = pathlib.Path(tempfile.mkdtemp(prefix="vocab-", dir=scratch_dir())) / "vocab.txt"
      out.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
      return str(out)
  return None


def find_config(path: str | os.PathLike, levels: int = 2) -> BertConfig | None:
  """The BertConfig of a checkpoint, workdir or HF dir from its config.json alone (no weights
  read), or None when there is none."""
  for d in _self_and_parents(path, levels):
    if (d / "config.json").is_file():
      return read_config_json(local_copy(str(d / "config.json")))
  return None


def find_lower_case(path: str | os.PathLike, vocab_path: str | None) -> bool | None:
  """do_lower_case from tokenizer_config.json, else inferred from the vocab."""
  for d in _self_and_parents(path, 2):
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
      value = json.loads(cfg.read_text(encoding="utf-8")).get("do_lower_case")
      if value is not None:
        return bool(value)
  if vocab_path is None:
    return None
  from bert_jax.tokenizer import load_tokenizer
  return load_tokenizer(vocab_path).lower_case


def _resolved(path: str | os.PathLike) -> epath.Path:
  """A local path resolved (symlinks too), or a gs:// URI as an epath."""
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(pathlib.Path(path).resolve())


def _self_and_parents(path, levels: int) -> list[epath.Path]:
  p = _resolved(path)
  return [p] + list(p.parents)[:levels]


# ----------------------------------------------------------------------------- bert-jax checkpoints

def checkpoint_params_dirs(path: str | os.PathLike) -> list[epath.Path]:
  """`params/` items under a checkpoint dir, a step dir or a workdir (local or gs://),
  newest first."""
  p = _resolved(path)
  if (p / "params").is_dir():
    return [p / "params"]
  ckpts = p / "checkpoints" if (p / "checkpoints").is_dir() else p
  steps = sorted((int(d.name), d) for d in ckpts.iterdir() if d.name.isdigit()) \
      if ckpts.is_dir() else []
  return [d / "params" for _, d in reversed(steps) if (d / "params").is_dir()]


def restore_params(params_dir: epath.Path) -> dict:
  import jax
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(_resolved(params_dir))
  return jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), restored)


def load_checkpoint(path: str | os.PathLike) -> tuple[BertConfig, dict, epath.Path]:
  """Newest restorable params of a bert-jax checkpoint; a damaged newest one is passed over."""
  candidates = checkpoint_params_dirs(path)
  if not candidates:
    raise UserError(f"{path}: no params/ checkpoint found; expected a bert-jax checkpoint, a "
                    "pretraining workdir, or a Hugging Face BERT directory")
  config_path = next((d / "config.json" for d in _self_and_parents(candidates[0].parent, 2)
                      if (d / "config.json").is_file()), None)
  if config_path is None:
    raise UserError(f"{path}: no config.json beside the checkpoint or in its parents")
  config = read_config_json(local_copy(str(config_path)))
  drop_closed_loop_noise()  # a damaged step's failed restore would print tracebacks
  for i, params_dir in enumerate(candidates):
    try:
      params = restore_params(params_dir)
      break
    except Exception as e:  # orbax raises many types for a partial or corrupt checkpoint
      from bert_jax.checkpoint import describe_damage
      if i + 1 == len(candidates):
        raise UserError(f"{params_dir}: cannot restore checkpoint ({describe_damage(e)})"
                        ) from None
      print(f"warning: {params_dir}: cannot restore ({describe_damage(e)}); using the one "
            "before", file=sys.stderr)
  return config, params, params_dir


def write_checkpoint(ckpt_dir: str | os.PathLike, config: BertConfig, params: dict,
                     vocab_path: str | None = None, lower_case: bool | None = None) -> None:
  """Writes a bert-jax checkpoint atomically: built under a temporary name, then renamed."""
  import orbax.checkpoint as ocp
  final = pathlib.Path(ckpt_dir).resolve()
  _refuse_nonempty(final)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
  try:
    params32 = _as_float32(params)
    # Host arrays written by this process alone: no barrier with processes that do not write.
    import jax
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                              active_processes={jax.process_index()})
    with ocp.StandardCheckpointer(multiprocessing_options=alone) as ckptr:
      ckptr.save(tmp / "params", params32)
    write_config_json(config, str(tmp / "config.json"))
    if vocab_path:
      shutil.copyfile(vocab_path, tmp / "vocab.txt")
    if lower_case is not None:
      write_json_atomic(tmp / "tokenizer_config.json", {"do_lower_case": bool(lower_case)})
    follow_umask(tmp)
    if final.exists():
      final.rmdir()
    os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_pretrained(path: str | os.PathLike, seed: int = 0, verbose: bool = True
                    ) -> tuple[BertConfig, dict]:
  """(config, params) from a Hugging Face BERT directory or a bert-jax checkpoint.

  params is {"bert": ..., "cls": ...}; heads the source lacks (a bare BertModel) are freshly
  initialised from `seed` and listed on stderr.
  """
  p = _resolved(path)  # a bert-jax checkpoint may be on gs://; HF directories are local
  if not p.exists():
    raise UserError(f"{path}: no such file or directory")
  if not is_remote(path) and is_hf_dir(p):
    config, params, _ = load_hf(p, seed=seed, verbose=verbose)
    return config, params
  config, params, _ = load_checkpoint(p)
  return config, params


def load_hf(hf_dir: str | os.PathLike, seed: int = 0, verbose: bool = True
            ) -> tuple[BertConfig, dict, list[str]]:
  """An HF BERT dir -> (config, params, HF keys that were missing and initialised)."""
  d = pathlib.Path(hf_dir)
  if not (d / "config.json").is_file():
    raise UserError(f"{d}: no config.json; expected a Hugging Face BERT directory")
  config = read_config_json(str(d / "config.json"))
  state, source = read_hf_state_dict(d)
  template = init_pretraining_params(config, seed)
  params, missing, unused = params_from_hf(state, template, source)
  encoder_missing = [k for k in missing if k.startswith("bert.") and "pooler" not in k]
  if encoder_missing:
    raise UserError(f"{source}: tensor {encoder_missing[0]} is missing "
                    f"({len(encoder_missing)} encoder tensors in all); not a BERT checkpoint?")
  if verbose and missing:
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
  final = pathlib.Path(hf_dir).resolve()
  if not force:
    _refuse_nonempty(final)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
  try:
    save_file(params_to_hf(_as_float32(params)), str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    write_config_json(config, str(tmp / "config.json"), architectures=tuple(architectures))
    if extra_config:
      cfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
      write_json_atomic(tmp / "config.json", {**cfg, **extra_config})
    if vocab_path:
      write_tokenizer_files(tmp, vocab_path, bool(lower_case), config.max_position_embeddings)
    follow_umask(tmp)  # not mkdtemp's 0700: others on a shared machine may read the model
    if final.exists():
      shutil.rmtree(final)
    os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_tokenizer_files(out_dir: pathlib.Path, vocab_path: str, lower_case: bool,
                          model_max_length: int) -> None:
  from tokenizers.implementations import BertWordPieceTokenizer
  tokens = pathlib.Path(vocab_path).read_text(encoding="utf-8").splitlines()
  absent = [t for t in SPECIAL_TOKENS if t not in tokens]
  if absent:
    raise UserError(f"{vocab_path}: special token(s) {', '.join(absent)} missing")
  shutil.copyfile(vocab_path, out_dir / "vocab.txt")
  BertWordPieceTokenizer(vocab_path, lowercase=lower_case, strip_accents=None if lower_case
                         else False).save(str(out_dir / "tokenizer.json"))
  special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
             "cls_token": "[CLS]", "mask_token": "[MASK]"}
  write_json_atomic(out_dir / "special_tokens_map.json", special)
  write_json_atomic(out_dir / "tokenizer_config.json", {
      "tokenizer_class": "BertTokenizer", "do_lower_case": lower_case,
      "tokenize_chinese_chars": True, "strip_accents": None,
      "model_max_length": model_max_length, "clean_up_tokenization_spaces": True, **special})


def _as_float32(params: dict) -> dict:
  import jax
  return jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), params)


def _refuse_nonempty(path: pathlib.Path) -> None:
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise UserError(f"{path}: already exists and is not empty; choose a new output directory")


# ----------------------------------------------------------------------------- CLI

def from_hf(hf_dir: str, ckpt_dir: str, seed: int = 0) -> list[str]:
  config, params, missing = load_hf(hf_dir, seed=seed)
  vocab = find_vocab(hf_dir, levels=0)
  if vocab is None:
    print(f"warning: {hf_dir}: no vocab.txt or tokenizer.json; the checkpoint has no vocabulary",
          file=sys.stderr)
  write_checkpoint(ckpt_dir, config, params, vocab, find_lower_case(hf_dir, vocab))
  return missing


def to_hf(ckpt_dir: str, hf_dir: str, force: bool = False) -> None:
  config, params, params_dir = load_checkpoint(ckpt_dir)
  vocab = find_vocab(params_dir.parent)
  if vocab is None:
    print(f"warning: {ckpt_dir}: no vocab.txt found; writing weights without tokenizer files",
          file=sys.stderr)
  if "cls" not in params:
    raise UserError(f"{params_dir}: has no pretraining heads (cls); expected a pretraining "
                    "checkpoint (fine-tuned models are exported by bert_jax.finetune --export-hf)")
  write_hf_dir(hf_dir, config, {"bert": params["bert"], "cls": params["cls"]}, vocab_path=vocab,
               lower_case=find_lower_case(params_dir.parent, vocab), force=force)
  return params_dir


@cli_entry
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="bert-jax-convert", description="Convert BERT checkpoints between bert-jax (orbax) "
      "and Hugging Face (safetensors).")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("from-hf", help="a Hugging Face BERT directory -> a bert-jax checkpoint")
  p.add_argument("hf_dir")
  p.add_argument("ckpt_dir")
  p.add_argument("--seed", type=int, default=0, help="seed for heads the source lacks")
  p = sub.add_parser("to-hf", help="a bert-jax checkpoint or pretraining workdir -> Hugging Face")
  p.add_argument("ckpt_dir")
  p.add_argument("hf_dir")
  p.add_argument("--force", action="store_true", help="replace an existing output directory")
  args = parser.parse_args(argv)
  if args.command == "from-hf":
    check_writable(args.ckpt_dir, "from-hf CKPT_DIR")
    if not is_hf_dir(args.hf_dir):
      raise UserError(f"{args.hf_dir}: expected a Hugging Face BERT directory with config.json "
                      "and model.safetensors or pytorch_model.bin")
    missing = from_hf(args.hf_dir, args.ckpt_dir, args.seed)
    print(f"wrote {args.ckpt_dir}" + (f" (initialised {len(missing)} absent tensors)"
                                       if missing else ""))
  else:
    check_writable(args.hf_dir, "to-hf HF_DIR")
    params_dir = to_hf(args.ckpt_dir, args.hf_dir, args.force)
    print(f"wrote {args.hf_dir} from {params_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
