"""A pretraining workdir made ready for the loop: vocab, each phase's data, the model config.

`prepare_workdir(cfg, workdir, ...)` returns a `RunPlan`: what the loop of `bert-jax pretrain`
trains, read and checked once before the first step (each phase's manifest.json is read once,
init_from's weights only when the run starts afresh). Every workdir, data and vocab path goes
through etils.epath (fileio), so gs:// works.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from typing import Any, Sequence

import jax
from array_record.python.array_record_module import ArrayRecordReader
from jax.experimental import multihost_utils

from bert_jax.config import (REMATS, BertConfig, find_config, get_preset, read_config_json,
                             write_config_json)
from bert_jax.convert import load_pretrained
from bert_jax.data import records
from bert_jax.data.create import create_data
from bert_jax.data.pipeline import check_fits
from bert_jax.devices import platforms
from bert_jax.errors import UserError, first_line
from bert_jax.pretraining.run_config import config_hash, objective_of, remat_of, to_plain
from bert_jax.storage.checkpoint import workdir_has_checkpoint
from bert_jax.training.phases import Phase
from bert_jax.storage.fileio import (as_path, copy_atomic, is_remote, local_copy, upload_tree,
                                     write_json_atomic)
from bert_jax.tokenizer import find_vocab
from bert_jax.vocab import train_vocab


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """One run of `bert-jax pretrain`, as prepared in its workdir."""
  phases: tuple[Phase, ...]
  config_hash: str
  model_config: BertConfig
  data_dirs: tuple[str, ...]        # one create-data directory per phase
  manifests: tuple[dict, ...]       # each phase's manifest.json, read once
  # phase index -> the least remat level to try (remat.json: less ran out of memory)
  remat_floors: dict[int, bool | str] = dataclasses.field(default_factory=dict)


def prepare_workdir(cfg: Any, workdir: str, *, process_count: int, is_writer: bool,
                    phases: Sequence[Phase]) -> tuple[RunPlan, Any]:
  """Vocab, data and model config of a run in `workdir` (created and locked by the caller),
  checked before anything is trained; the writer then records the configs. Returns (plan,
  init_from's weights: None when the workdir holds checkpoints or without init_from)."""
  phases = tuple(phases)
  resuming = workdir_has_checkpoint(workdir)
  vocab_file = as_path(workdir) / "vocab.txt"
  vocab_existed = vocab_file.exists()
  try:  # the cheap checks come before data creation, the writes of configs after all checks
    vocab = prepare_vocab(cfg, workdir, is_writer)
    model_config, init_params = load_model(cfg, vocab, workdir, load_weights=not resuming)
    if resuming:
      _check_same_model(model_config, workdir)
    _check_model(model_config, phases, process_count)
    data_dirs = prepare_data(cfg, phases, workdir, vocab, is_writer)
    manifests = read_manifests(phases, data_dirs)
    _check_data(cfg, model_config, vocab, phases, data_dirs, manifests)
  except Exception:
    # A failed first set-up leaves no vocab.txt behind that would refuse the corrected rerun.
    if is_writer and not vocab_existed and vocab_file.exists():
      vocab_file.unlink()
    raise
  if is_writer:
    _write_resolved_config(cfg, workdir)
    write_config_json(model_config, as_path(workdir) / "config.json")
  plan = RunPlan(phases=phases, config_hash=config_hash(cfg), model_config=model_config,
                 data_dirs=tuple(data_dirs), manifests=tuple(manifests),
                 remat_floors=recorded_remat_floors(workdir))
  return plan, init_params


# --------------------------------------------------------------------------- remat.json

REMAT_RECORD = "remat.json"  # {"phases": {"1": "dots"}}: per phase the least level (remat auto)


def recorded_remat_floors(workdir: str) -> dict[int, bool | str]:
  """Per phase (0-based) the least remat level to try: the levels below ran out of device
  memory in an earlier start of this workdir, and are not tried again."""
  path = as_path(workdir) / REMAT_RECORD
  if not path.exists():
    return {}
  try:
    floors = {int(i): level for i, level in
              json.loads(path.read_text(encoding="utf-8"))["phases"].items()}
    if all(level in REMATS and level is not False for level in floors.values()):
      return floors
    raise ValueError(f"levels {sorted(map(str, floors.values()))}, expected dots or true")
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    warnings.warn(f"{path}: unreadable ({first_line(e)}); each phase is tried without remat "
                  "again", stacklevel=2)
    return {}


def record_remat_floor(workdir: str, index: int, level: bool | str) -> None:
  floors = {str(i): v for i, v in recorded_remat_floors(workdir).items()}
  floors[str(index)] = level
  write_json_atomic(as_path(workdir) / REMAT_RECORD, dict(phases=floors))


# --------------------------------------------------------------------------- the vocab

def count_lines(path: str) -> int:
  """Entries of a vocab.txt as the tokenizer numbers them: every line, blank ones too
  (bert-base-chinese has an empty token at id 343)."""
  with as_path(path).open("r", encoding="utf-8") as f:
    return sum(1 for _ in f)


def prepare_vocab(cfg: Any, workdir: str, is_writer: bool) -> str:
  """workdir/vocab.txt: from data.vocab, else init_from's vocab, else trained from data.input."""
  target = as_path(workdir) / "vocab.txt"
  source = str(cfg.data.vocab)
  if not source and cfg.init_from:
    source = find_vocab(str(cfg.init_from)) or ""
  if source:
    if not as_path(source).is_file():
      raise UserError(f"--config.data.vocab={source}: no such file; expected a vocab.txt")
    if target.exists():
      if as_path(source).read_bytes() != target.read_bytes():
        raise UserError(f"{target} differs from {source}: this workdir was started with "
                        "another vocab; use a new --workdir")
    elif is_writer:
      copy_atomic(source, target)
    return str(target) if is_writer or target.exists() else source
  if target.exists():
    return str(target)
  if cfg.data.vocab_required:
    raise UserError("this config needs a vocab: give --config.data.vocab=PATH (or the "
                    "config argument, e.g. configs/chinese_base.py:/path/vocab.txt)")
  inputs = list(cfg.data.input)
  if not inputs:
    raise UserError("no vocab: give --config.data.vocab=PATH or a corpus to train one from "
                    "with --config.data.input='[\"corpus.txt\"]'")
  if is_writer:
    print(f"training a {cfg.data.vocab_size}-entry vocab from {inputs} -> {target}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bert-jax-vocab-") as tmp:
      local = target if not is_remote(target) else os.path.join(tmp, "vocab.txt")
      train_vocab(inputs, int(cfg.data.vocab_size), str(local),
                  lower_case=bool(cfg.data.lower_case),
                  text_field=cfg.data.get("text_field") or None,
                  allow_replaced_bytes=bool(cfg.data.get("allow_replaced_bytes", False)))
      if is_remote(target):
        copy_atomic(local, target)
  return str(target)


# --------------------------------------------------------------------------- the model

def model_config_for(cfg: Any, vocab_entries: int, init_config: BertConfig | None = None,
                    vocab: str = "the vocab", device: Any = None) -> BertConfig:
  """The model of a run: init_from's config (`init_config`) or the preset, plus
  model.overrides, dtype (auto: by `device`, default jax's first), remat (auto: off here, chosen
  per phase by steps.Pretraining) and attention; checked against the vocab's size. No I/O."""
  remat = remat_of(cfg)
  run = dict(dtype=platforms.compute_dtype(str(cfg.model.dtype), device or jax.devices()[0]),
             remat=False if remat == "auto" else remat,
             attention=str(cfg.model.get("attention", "auto")))
  overrides = to_plain(cfg.model.overrides)
  if init_config is not None:
    model_config = init_config.replace(**{**overrides, **run})
    if model_config.vocab_size != vocab_entries:
      raise UserError(f"--config.init_from={cfg.init_from}: its vocab_size is "
                      f"{model_config.vocab_size} but {vocab} has {vocab_entries} entries; "
                      "pretrain with the model's own vocab (--config.data.vocab)")
    return model_config
  fields = {f.name for f in dataclasses.fields(BertConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise UserError(f"--config.model.overrides: unknown BertConfig field(s) {unknown}")
  overrides.setdefault("vocab_size", vocab_entries)
  if overrides["vocab_size"] < vocab_entries:
    raise UserError(f"--config.model.overrides.vocab_size={overrides['vocab_size']} is "
                    f"smaller than {vocab} ({vocab_entries} entries)")
  return get_preset(str(cfg.model.preset), **{**overrides, **run})


def load_model(cfg: Any, vocab: str, workdir: str, load_weights: bool = True
                 ) -> tuple[BertConfig, Any]:
  """(BertConfig, init params or None): from init_from, else the preset plus overrides.
  Without `load_weights` (a resumed run) init_from's config.json alone is read."""
  init_config = init_params = None
  if cfg.init_from and load_weights:
    init_config, init_params = load_pretrained(str(cfg.init_from), seed=int(cfg.seed))
  elif cfg.init_from:
    init_config = find_config(str(cfg.init_from))
    written = as_path(workdir) / "config.json"
    if init_config is None and written.is_file():  # init_from is gone; the model it started
      init_config = read_config_json(local_copy(str(written)))
  return model_config_for(cfg, count_lines(vocab), init_config, vocab), init_params


def load_init_params(cfg: Any) -> Any:
  """init_from's weights (None without init_from), for a resumed run that restored nothing."""
  if not cfg.init_from:
    return None
  return load_pretrained(str(cfg.init_from), seed=int(cfg.seed))[1]


# Fields a resumed run may change: they shape no parameter and only matter from now on.
_RESUMABLE_CHANGES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range")


def _check_same_model(model_config: BertConfig, workdir: str) -> None:
  """A resumed run's model must be the one its checkpoints were written for (config.json):
  refused here, before the checkpoints are read (a mismatch is not damage)."""
  written = as_path(workdir) / "config.json"
  if not written.is_file():
    return
  before = read_config_json(local_copy(str(written))).to_hf_dict()
  now = model_config.to_hf_dict()
  changed = [f"{k} {before[k]} -> {now[k]}" for k in now
             if k not in _RESUMABLE_CHANGES and before.get(k) != now[k]]
  if changed:
    raise UserError(f"--workdir {workdir}: its checkpoints were written for another model "
                    f"(changed: {', '.join(changed)}); resume with the model config it was "
                    "started with (config.json, config.pretrain.json), or use a new --workdir")


def _check_model(model_config: BertConfig, phases: Sequence[Phase], process_count: int) -> None:
  for phase in phases:
    where = f"--config.phases.{phase.index}"
    if phase.seq_len > model_config.max_position_embeddings:
      raise UserError(f"{where}.seq_len={phase.seq_len} exceeds the model's "
                      f"max_position_embeddings={model_config.max_position_embeddings}")
    if phase.batch_size % process_count:
      raise UserError(f"{where}.batch_size={phase.batch_size}: expected a multiple of the "
                      f"{process_count} processes")


# --------------------------------------------------------------------------- the data

def phase_data_dir(phase: Any, workdir: str) -> str:
  return phase.data or str(as_path(workdir) / "data" / f"phase_{phase.index}")


def _create_phase_data(data_dir: str, **kwargs: Any) -> None:
  """create-data into `data_dir`; for a gs:// directory, locally first and then uploaded
  (manifest.json last, so an interrupted upload is not mistaken for complete data)."""
  if not is_remote(data_dir):
    create_data(output_dir=data_dir, **kwargs)
    return
  with tempfile.TemporaryDirectory(prefix="bert-jax-data-") as tmp:
    create_data(output_dir=os.path.join(tmp, "data"), **kwargs)
    upload_tree(os.path.join(tmp, "data"), data_dir, last=("manifest.json",))


def prepare_data(cfg: Any, phases: Sequence[Phase], workdir: str, vocab: str,
                 is_writer: bool) -> list[str]:
  """One create-data directory per phase; missing ones under workdir/data are created."""
  dirs = []
  for phase in phases:
    data_dir = phase_data_dir(phase, workdir)
    has_manifest = (as_path(data_dir) / "manifest.json").is_file()
    if phase.data and not has_manifest:
      raise UserError(f"--config.phases.{phase.index}.data={phase.data}: not a create-data "
                      "output directory (no manifest.json)")
    if not has_manifest and is_writer:
      inputs = list(cfg.data.input)
      if not inputs:
        raise UserError(f"no data for phase {phase.index + 1}: give --config.phases."
                        f"{phase.index}.data=DIR (from bert-jax create-data) or a corpus with "
                        "--config.data.input='[\"corpus.txt\"]'")
      print(f"creating phase {phase.index + 1} data (seq {phase.seq_len}, "
            f"{phase.max_predictions} predictions) -> {data_dir}", flush=True)
      _create_phase_data(data_dir, inputs=inputs, vocab_path=local_copy(vocab),
                         max_seq_length=phase.seq_len,
                         max_predictions_per_seq=phase.max_predictions,
                         masked_lm_prob=float(cfg.data.masked_lm_prob),
                         dupe_factor=int(cfg.data.dupe_factor),
                         short_seq_prob=float(cfg.data.short_seq_prob),
                         seed=int(cfg.seed) + 7919 * phase.index,
                         whole_word_mask=bool(cfg.data.whole_word_mask),
                         lower_case=bool(cfg.data.lower_case),
                         eval_fraction=float(cfg.data.eval_fraction),
                         static_masking=not bool(cfg.data.dynamic_masking), progress=False,
                         text_field=cfg.data.get("text_field") or None,
                         allow_replaced_bytes=bool(cfg.data.get("allow_replaced_bytes", False)),
                         objective=objective_of(cfg),
                         doc_sentences=bool(cfg.data.get("doc_sentences", False)))
    dirs.append(data_dir)
  _sync("data-created")
  return dirs


def read_manifests(phases: Sequence[Phase], data_dirs: Sequence[str]) -> list[dict]:
  """Each phase's manifest.json (one read each: a round trip on gs://), checked to fit it."""
  manifests = []
  for phase, data_dir in zip(phases, data_dirs):
    man = records.read_manifest(data_dir)
    check_fits(man, phase.seq_len, phase.max_predictions,
               where=f"phase {phase.index + 1} data {data_dir}")
    # The pipeline pads shorter data, but a phase's longer positions would never be trained.
    if man["max_seq_length"] < phase.seq_len:
      raise UserError(f"--config.phases.{phase.index}.data={data_dir}: instances were created "
                      f"with --max-seq-length {man['max_seq_length']}, shorter than this "
                      f"phase's seq_len {phase.seq_len} (positions {man['max_seq_length']}-"
                      f"{phase.seq_len - 1} would never be trained); run create-data with "
                      f"--max-seq-length {phase.seq_len}")
    manifests.append(man)
  return manifests


def _check_data(cfg: Any, model_config: BertConfig, vocab: str, phases: Sequence[Phase],
                data_dirs: Sequence[str], manifests: Sequence[dict]) -> None:
  vocab_sha = hashlib.sha256(as_path(vocab).read_bytes()).hexdigest()
  model_vocab = model_config.vocab_size
  for phase, data_dir, man in zip(phases, data_dirs, manifests):
    objective, made_for = objective_of(cfg), man.get("objective", "mlm_nsp")  # older: pairs
    if made_for != objective:
      raise UserError(f"--config.objective={objective}: phase {phase.index + 1} data {data_dir} "
                      f"was created for objective {made_for} (its manifest.json); give data "
                      f"from bert-jax create-data --objective {objective}, or "
                      f"--config.objective={made_for}")
    made_with = man["vocab"]
    data_vocab = made_with["size"]
    if data_vocab > model_vocab or (cfg.init_from and data_vocab != model_vocab):
      raise UserError(f"{data_dir}: made with a {data_vocab}-entry vocab, but the model's "
                      f"vocab_size is {model_vocab}; the data and the model must share one "
                      "vocab")
    if made_with.get("sha256") not in (None, vocab_sha):
      raise UserError(f"{data_dir}: made with another vocab ({made_with.get('path')}, sha256 "
                      f"{made_with['sha256'][:12]}) than this run's {vocab} (sha256 "
                      f"{vocab_sha[:12]}); recreate the data with bert-jax create-data --vocab "
                      "of this run, or pretrain with the data's vocab (--config.data.vocab)")
    _check_shards(data_dir, man, f"--config.phases.{phase.index}.data")
    train = man["splits"]["train"]["num_instances"]
    if phase.batch_size > train:  # every batch would repeat instances within itself
      raise UserError(f"--config.phases.{phase.index}.batch_size={phase.batch_size}: larger than "
                      f"the {train} training instances of {data_dir}; expected at most {train} "
                      "(or more data: a larger corpus or --dupe-factor)")


def _check_shards(data_dir: str, man: dict, flag: str) -> None:
  """Every shard opens and holds the manifest's instance count, and small local data is read
  whole: a damaged shard is one line now, not a traceback when a batch needs it hours later."""
  for split, info in man["splits"].items():
    paths = records.shard_paths(data_dir, split, man)
    read_all = not is_remote(data_dir) and sum(map(os.path.getsize, paths)) <= 64 << 20
    count = 0
    for path in paths:
      try:
        reader = ArrayRecordReader(path)
        try:
          count += reader.num_records()
          if read_all and reader.num_records():
            reader.read(0, reader.num_records())
        finally:
          reader.close()
      except Exception as e:  # array_record raises RuntimeError/OSError for damaged files
        raise UserError(f"{flag}={data_dir}: shard {path} cannot be read ({first_line(e)}); "
                        "recreate the data with bert-jax create-data") from None
    if count != info["num_instances"]:
      raise UserError(f"{flag}={data_dir}: its {split} shards hold {count} instances but "
                      f"{records.MANIFEST} says {info['num_instances']}: damaged or truncated; "
                      "recreate the data with bert-jax create-data")


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------- the configs

def _write_resolved_config(cfg: Any, workdir: str) -> None:
  path = as_path(workdir) / "config.pretrain.json"
  resolved = to_plain(cfg)
  if path.exists():
    try:
      before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
      before = None
    if isinstance(before, dict) and before != resolved:
      changed = sorted(k for k in set(before) | set(resolved)
                       if before.get(k) != resolved.get(k))
      warnings.warn(f"{path}: the config differs from the one this workdir was started "
                    f"with (changed: {', '.join(changed)}); continuing with the new one",
                    stacklevel=2)
  write_json_atomic(path, resolved)
