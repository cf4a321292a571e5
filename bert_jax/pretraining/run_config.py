"""Run configs for `bert-jax pretrain`: ml_collections Python files, `--config.a.b=value`
overrides parsed to each field's type, and validation with one-line errors naming the flag.

  bert-jax pretrain --config configs/X.py[:arg] --workdir DIR [--config.a.b=value ...]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import os
import runpy
import sys
from typing import Any

import ml_collections

from bert_jax.config import BertConfig
from bert_jax.errors import UserError


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> get_config(arg), loaded by path (configs are not a package)."""
  path, arg = spec, ""
  if ".py:" in spec:  # the argument follows the file name (a path may itself contain ':')
    path, arg = spec.rsplit(".py:", 1)
    path += ".py"
  if not os.path.isfile(path):
    raise UserError(f"--config {path}: no such file; expected a config .py file")
  try:
    module = runpy.run_path(path, run_name="bert_jax_config")
  except UserError:
    raise
  except Exception as e:
    raise UserError(f"--config {path}: cannot load ({e.__class__.__name__}: {e})") from None
  if "get_config" not in module:
    raise UserError(f"--config {path}: defines no get_config(arg)")
  try:
    cfg = module["get_config"](arg or None)
  except UserError:
    raise
  except Exception as e:
    raise UserError(f"--config {spec}: get_config failed ({e.__class__.__name__}: {e})") from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise UserError(f"--config {path}: get_config returned {type(cfg).__name__}; expected an "
                    "ml_collections.ConfigDict")
  return cfg


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _parse_value(flag: str, old: Any, text: str) -> Any:
  """`text` parsed to the type of the field's current value `old`."""
  def bad(expected: str):
    return UserError(f"{flag}={text!r}: expected {expected}")
  if isinstance(old, bool):
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise bad("true or false")
  if isinstance(old, int):
    try:
      return int(text.replace("_", ""))
    except ValueError:
      try:
        value = float(text)  # 1e6 is a fine way to write a step count
      except ValueError:
        raise bad("an integer") from None
      if not value.is_integer():
        raise bad("an integer") from None
      return int(value)
  if isinstance(old, float):
    try:
      return float(text)
    except ValueError:
      raise bad("a number") from None
  if isinstance(old, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if text.lstrip()[:1] in ("[", "(", "{"):
      raise bad("a Python literal (quote strings; dict(...) is not a literal, {...} is)") \
          from None
    if isinstance(old, (list, tuple)):
      return [t for t in text.split(",") if t]  # a,b,c is a list of strings
    if old is None:
      return text
    raise bad(f"a Python literal ({type(old).__name__})") from None
  if isinstance(old, (list, tuple)):
    if isinstance(value, str):
      return [value]
    if not isinstance(value, (list, tuple)):
      raise bad("a list")
    if old and isinstance(old[0], (dict, ml_collections.ConfigDict)) and not all(
        isinstance(v, dict) for v in value):
      raise bad("a list of dicts")
    return list(value)
  if isinstance(old, (dict, ml_collections.ConfigDict)):
    if not isinstance(value, dict):
      raise bad("a dict")
    return value
  return value


def _bert_field_default(name: str) -> Any:
  for f in dataclasses.fields(BertConfig):
    if f.name == name:
      return f.default
  return _MISSING


_MISSING = object()


_WORDS = ("model.remat",)  # fields whose value may be a bool or a word (auto): kept as written


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[tuple[str, str]]) -> None:
  """Applies `a.b.c=value` overrides in order; unknown fields and bad values raise UserError.

  List elements are addressed by index (phases.0.batch_size); model.overrides takes any
  BertConfig field.
  """
  for key, text in overrides:
    flag = f"--config.{key}"
    parts = key.split(".")
    node: Any = cfg
    for depth, part in enumerate(parts[:-1]):
      node = _child(node, part, flag, ".".join(parts[:depth + 1]))
    last = parts[-1]
    if isinstance(node, list):
      index = _index(node, last, flag)
      node[index] = _parse_value(flag, node[index], text)
      continue
    if last not in node:
      if key.startswith("model.overrides.") and len(parts) == 3:
        default = _bert_field_default(last)
        if default is _MISSING:
          raise UserError(f"{flag}: {last!r} is not a BertConfig field")
        node[last] = _parse_value(flag, default, text)
        continue
      raise UserError(f"{flag}: no such config field; expected one of "
                      f"{', '.join(sorted(node.keys()))}")
    value = text if key in _WORDS else _parse_value(flag, node[last], text)
    if isinstance(node, ml_collections.ConfigDict):
      with node.ignore_type():
        setattr(node, last, value)
    else:
      node[last] = value


def _index(node: list, part: str, flag: str) -> int:
  try:
    index = int(part)
  except ValueError:
    raise UserError(f"{flag}: {part!r} is not a list index") from None
  if not -len(node) <= index < len(node):
    raise UserError(f"{flag}: index {index} out of range (the list has {len(node)} items)")
  return index


def _child(node: Any, part: str, flag: str, where: str) -> Any:
  if isinstance(node, list):
    return node[_index(node, part, flag)]
  if isinstance(node, (dict, ml_collections.ConfigDict)) and part in node:
    child = node[part]
    if isinstance(child, tuple):  # make lists inside the config editable in place
      child = list(child)
      node[part] = child
    if isinstance(child, (list, dict, ml_collections.ConfigDict)):
      return child
    raise UserError(f"{flag}: --config.{where} is a {type(child).__name__}, not a group")
  raise UserError(f"{flag}: no such config field --config.{where}")


def to_plain(value: Any) -> Any:
  """ConfigDict/tuples -> plain JSON-able dicts and lists."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): to_plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_plain(v) for v in value]
  return value


def config_hash(cfg: Any) -> str:
  text = json.dumps(to_plain(cfg), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- command line

def parse_args(argv: list[str]) -> tuple[str, str, list[tuple[str, str]]]:
  parser = argparse.ArgumentParser(
      prog="bert-jax pretrain",
      description="Pretrain BERT (MLM + NSP) from an ml_collections config file.",
      epilog="Override any config field with --config.a.b=value (e.g. --config.total_steps=200, "
             "--config.phases.0.batch_size=8, --config.data.input='[\"a.txt\"]').")
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]",
                      help="config file defining get_config(arg), e.g. configs/tiny_cpu.py")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics, vocab and data")
  args, rest = parser.parse_known_args(argv)
  return args.config, args.workdir, parse_overrides(rest)


def parse_overrides(rest: list[str]) -> list[tuple[str, str]]:
  """`--config.a.b=v` / `--config.a.b v` arguments -> [("a.b", "v"), ...]; anything else is a
  UserError."""
  overrides = []
  i = 0
  while i < len(rest):
    arg = rest[i]
    if not arg.startswith("--config."):
      raise UserError(f"unexpected argument {arg!r}; expected --config.FIELD=VALUE overrides")
    if "=" in arg:
      key, value = arg[2:].split("=", 1)
    elif i + 1 < len(rest):
      key, value = arg[2:], rest[i + 1]
      i += 1
    else:
      raise UserError(f"{arg}: missing a value (--config.FIELD=VALUE)")
    overrides.append((key[len("config."):], value))
    i += 1
  return overrides


def resolve_config(spec: str, overrides: list[tuple[str, str]]) -> ml_collections.ConfigDict:
  """The config file with the command line's overrides, validated."""
  cfg = load_config_file(spec)
  configured_total = int(cfg.total_steps)
  apply_overrides(cfg, overrides)
  scale_warmup(cfg, configured_total, {key for key, _ in overrides})
  validate_config(cfg)
  return cfg


def scale_warmup(cfg: ml_collections.ConfigDict, configured_total: int,
                 overridden: set[str]) -> list[str]:
  """`--config.total_steps=N` shortens the whole schedule, warmup included: every warmup the
  config file set for its own total_steps (optim.warmup_steps, a phase's warmup_steps) is
  scaled by N / that total, unless it is given on the command line too. The scaling is printed
  (stderr) and returned."""
  total = int(cfg.total_steps)
  if "total_steps" not in overridden or total == configured_total or configured_total < 1:
    return []
  ratio = total / configured_total
  fields = [("optim.warmup_steps", cfg.optim, "warmup_steps")]
  fields += [(f"phases.{i}.warmup_steps", p, "warmup_steps") for i, p in enumerate(cfg.phases)]
  notes = []
  for key, node, name in fields:
    old = node.get(name, -1) if hasattr(node, "get") else -1
    if key in overridden or not isinstance(old, int) or old <= 0:
      continue  # given by the user, absent, or -1 (inherits optim.warmup_steps)
    new = int(round(old * ratio))
    if isinstance(node, ml_collections.ConfigDict):
      with node.ignore_type():
        setattr(node, name, new)
    else:
      node[name] = new
    notes.append(f"{key} {old} -> {new}")
  if notes:
    print(f"--config.total_steps={total}: warmup scaled with it, x{ratio:.3g} of the config's "
          f"{configured_total} steps ({', '.join(notes)}); give --config.optim.warmup_steps=N "
          "to choose it", file=sys.stderr, flush=True)
  return notes


def objective_of(cfg: Any) -> str:
  """The run's pretraining objective ("mlm_nsp" for a config file written before it existed)."""
  return str(cfg.get("objective", "mlm_nsp"))


def remat_of(cfg: Any) -> bool | str:
  """model.remat as True, False, "dots" or "auto" (config files give a bool or a word; the
  command line a word)."""
  value = cfg.model.get("remat", False)
  text = str(value).lower()
  if isinstance(value, bool) or text in _TRUE + _FALSE:
    return text in _TRUE
  if text not in ("auto", "dots"):
    raise UserError(f"--config.model.remat={value!r}: expected true, false, dots or auto")
  return text


def validate_config(cfg: ml_collections.ConfigDict) -> list:
  """UserError naming the first bad field; returns the config's phases."""
  from bert_jax.config import PRESETS
  from bert_jax.training.phases import make_phases
  from bert_jax.training.steps import NAN_POLICIES, check_objective
  if cfg.nan_policy not in NAN_POLICIES:
    raise UserError(f"--config.nan_policy={cfg.nan_policy!r}: expected one of {NAN_POLICIES}")
  check_objective(objective_of(cfg))
  if cfg.model.preset not in PRESETS:
    raise UserError(f"--config.model.preset={cfg.model.preset!r}: expected one of "
                    f"{', '.join(PRESETS)}")
  if cfg.model.dtype not in ("auto", "float32", "bfloat16", "float16"):
    raise UserError(f"--config.model.dtype={cfg.model.dtype!r}: expected auto, float32, "
                    "bfloat16 or float16")
  remat_of(cfg)
  from bert_jax.config import ATTENTIONS
  if cfg.model.get("attention", "auto") not in ATTENTIONS:
    raise UserError(f"--config.model.attention={cfg.model.attention!r}: expected one of "
                    f"{', '.join(ATTENTIONS)}")
  from bert_jax.training.optim import check_optim_config
  check_optim_config(cfg.optim)
  for key in ("log_every", "eval_every", "checkpoint.every_steps"):
    node = cfg
    for part in key.split("."):
      node = node[part]
    if node < 0:
      raise UserError(f"--config.{key}={node}: expected a non-negative integer")
  phases = make_phases(cfg)  # raises UserError naming the bad phase field
  if cfg.optim.schedule == "continuous" and cfg.optim.warmup_steps >= cfg.total_steps > 0:
    raise UserError(f"--config.optim.warmup_steps={cfg.optim.warmup_steps}: at or beyond the "
                    f"end of training (total_steps={cfg.total_steps}); expected fewer warmup "
                    "steps than steps")
  for phase in phases if cfg.optim.schedule == "per_phase" else ():
    if phase.warmup_steps >= phase.num_steps > 0:
      raise UserError(f"--config.phases.{phase.index}.warmup_steps={phase.warmup_steps}: at or "
                      f"beyond the end of phase {phase.index + 1} ({phase.num_steps} steps; "
                      "per_phase schedules warm up in every phase); expected fewer")
  return phases
