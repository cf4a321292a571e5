"""`bert-jax pretrain`: the pretraining loop (phases, metrics, checkpoints, preemption).

  bert-jax pretrain --config configs/X.py[:arg] --workdir DIR [--config.a.b=value ...]

One global step counter; `phase_at(step)` picks the sequence length, predictions, batch and data
of each step; one compiled train step per phase. A phase boundary saves a checkpoint and
switches the data iterator. Rerunning in the same workdir resumes from the newest complete
checkpoint; SIGTERM (a TPU preemption) finishes the step, saves and exits 0. The rng of step s
is fold_in(base, s) and the data-iterator state is checkpointed, so a resumed run computes the
same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from typing import Any, Iterator

import ml_collections

from bert_jax import hostmem
from bert_jax.config import BertConfig, get_preset, write_config_json
from bert_jax.errors import UserError, cli_entry, first_line
from bert_jax.fileio import as_path, check_writable, copy_atomic, is_remote, local_copy, \
  upload_tree, write_json_atomic
from bert_jax.lock import DirLock
from bert_jax.run_config import config_hash, parse_args, resolve_config, to_plain

EXIT_NONFINITE = 3  # the run stopped on a non-finite loss (nan_policy=stop)


# --------------------------------------------------------------------------- workdir set-up
# Every workdir, data and vocab path goes through etils.epath (fileio), so gs:// works.

def count_lines(path: str) -> int:
  with as_path(path).open("r", encoding="utf-8") as f:
    return sum(1 for line in f if line.rstrip("\n"))


def prepare_vocab(cfg: Any, workdir: str, is_writer: bool) -> str:
  """workdir/vocab.txt: from data.vocab, else init_from's vocab, else trained from data.input."""
  target = as_path(workdir) / "vocab.txt"
  source = str(cfg.data.vocab)
  if not source and cfg.init_from:
    from bert_jax.tokenizer import find_vocab
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
    from bert_jax.vocab import train_vocab
    print(f"training a {cfg.data.vocab_size}-entry vocab from {inputs} -> {target}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bert-jax-vocab-") as tmp:
      local = target if not is_remote(target) else os.path.join(tmp, "vocab.txt")
      train_vocab(inputs, int(cfg.data.vocab_size), str(local),
                  lower_case=bool(cfg.data.lower_case),
                  allow_replaced_bytes=bool(cfg.data.get("allow_replaced_bytes", False)))
      if is_remote(target):
        copy_atomic(local, target)
  return str(target)


def phase_data_dir(phase: Any, workdir: str) -> str:
  return phase.data or str(as_path(workdir) / "data" / f"phase_{phase.index}")


def _create_phase_data(data_dir: str, **kwargs: Any) -> None:
  """create-data into `data_dir`; for a gs:// directory, locally first and then uploaded
  (manifest.json last, so an interrupted upload is not mistaken for complete data)."""
  from bert_jax.data.create import create_data
  if not is_remote(data_dir):
    create_data(output_dir=data_dir, **kwargs)
    return
  with tempfile.TemporaryDirectory(prefix="bert-jax-data-") as tmp:
    create_data(output_dir=os.path.join(tmp, "data"), **kwargs)
    upload_tree(os.path.join(tmp, "data"), data_dir, last=("manifest.json",))


def prepare_data(cfg: Any, phases: list, workdir: str, vocab: str, is_writer: bool) -> list[str]:
  """One create-data directory per phase; missing ones under workdir/data are created."""
  from bert_jax.data.pipeline import manifest
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
                         allow_replaced_bytes=bool(cfg.data.get("allow_replaced_bytes", False)))
    dirs.append(data_dir)
  _sync("data-created")
  from bert_jax.data.pipeline import check_fits
  for phase, data_dir in zip(phases, dirs):
    check_fits(manifest(data_dir), phase.seq_len, phase.max_predictions,
               where=f"phase {phase.index + 1} data {data_dir}")
  return dirs


def _check_shards(data_dir: str, flag: str) -> None:
  """Every shard opens and holds the manifest's instance count, and small local data is read
  whole: a damaged shard is one line now, not a traceback when a batch needs it hours later."""
  from array_record.python.array_record_module import ArrayRecordReader
  from bert_jax.data import records
  man = records.read_manifest(data_dir)
  for split, info in man["splits"].items():
    paths = records.shard_paths(data_dir, split)
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
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def bert_config_for(cfg: Any, vocab_entries: int, init_config: BertConfig | None = None,
                    vocab: str = "the vocab") -> BertConfig:
  """The model of a run: init_from's config (`init_config`) or the preset, plus
  model.overrides, dtype and remat; checked against the vocab's size. No I/O."""
  run = dict(dtype=str(cfg.model.dtype), remat=bool(cfg.model.remat))
  overrides = to_plain(cfg.model.overrides)
  if init_config is not None:
    bert_config = init_config.replace(**{**overrides, **run})
    if bert_config.vocab_size != vocab_entries:
      raise UserError(f"--config.init_from={cfg.init_from}: its vocab_size is "
                      f"{bert_config.vocab_size} but {vocab} has {vocab_entries} entries; "
                      "pretrain with the model's own vocab (--config.data.vocab)")
    return bert_config
  fields = {f.name for f in dataclasses.fields(BertConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise UserError(f"--config.model.overrides: unknown BertConfig field(s) {unknown}")
  overrides.setdefault("vocab_size", vocab_entries)
  if overrides["vocab_size"] < vocab_entries:
    raise UserError(f"--config.model.overrides.vocab_size={overrides['vocab_size']} is "
                    f"smaller than {vocab} ({vocab_entries} entries)")
  return get_preset(str(cfg.model.preset), **{**overrides, **run})


def model_config(cfg: Any, vocab: str) -> tuple[BertConfig, Any]:
  """(BertConfig, init params or None): from init_from, else the preset plus overrides."""
  init_config = init_params = None
  if cfg.init_from:
    from bert_jax.convert import load_pretrained
    init_config, init_params = load_pretrained(str(cfg.init_from), seed=int(cfg.seed))
  return bert_config_for(cfg, count_lines(vocab), init_config, vocab), init_params


# --------------------------------------------------------------------------- the loop

class Preemption:
  """SIGTERM sets a flag; the loop finishes its step, saves and exits. On several hosts the
  JAX preemption sync point (through orbax) makes every host stop at the same step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self) -> None:
    def handler(signum, frame):
      del frame
      self.requested = True
      print(f"received signal {signum}: saving a checkpoint after this step", flush=True)
    self._previous = signal.signal(signal.SIGTERM, handler)

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _mfu_functions():
  try:
    from bert_jax import mfu
    return mfu.train_flops_per_sequence, mfu.peak_flops_per_device
  except ImportError:  # MFU is reported when bert_jax.mfu is there
    return None, None


class Trainer:
  """The pretraining loop over one workdir; `run()` returns the exit code."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
    self.cfg = cfg
    self.workdir = str(as_path(workdir))  # absolute if local; a gs:// URI stays as it is
    self.lock = DirLock(self.workdir, "--workdir")

  # -- set-up ----------------------------------------------------------------------------------

  def _setup(self) -> None:
    import jax
    from bert_jax.phases import make_phases
    from bert_jax.sharding import check_batches_split, initialize_distributed, make_mesh
    initialize_distributed()
    cfg, workdir = self.cfg, self.workdir
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    self.is_writer = self.process_index == 0
    as_path(workdir).mkdir(parents=True, exist_ok=True)
    if self.is_writer:  # process 0 holds it for all hosts (best-effort on gs://, see lock.py)
      self.lock.acquire()
    self.phases = make_phases(cfg)
    self.config_hash = config_hash(cfg)
    vocab_file = as_path(workdir) / "vocab.txt"
    vocab_existed = vocab_file.exists()
    try:  # the cheap checks come before data creation, the writes of configs after all checks
      self.vocab = prepare_vocab(cfg, workdir, self.is_writer)
      self.bert_config, self.init_params = model_config(cfg, self.vocab)
      self._check_model()
      self.data_dirs = prepare_data(cfg, self.phases, workdir, self.vocab, self.is_writer)
      self._check_data()
    except Exception:
      # A failed first set-up leaves no vocab.txt behind that would refuse the corrected rerun.
      if self.is_writer and not vocab_existed and vocab_file.exists():
        vocab_file.unlink()
      raise
    if self.is_writer:
      self._write_resolved_config()
      write_config_json(self.bert_config, as_path(workdir) / "config.json")
    self.mesh = make_mesh(int(cfg.mesh.data), int(cfg.mesh.fsdp), int(cfg.mesh.tensor))
    check_batches_split(self.phases, self.mesh)

  def _write_resolved_config(self) -> None:
    path = as_path(self.workdir) / "config.pretrain.json"
    resolved = to_plain(self.cfg)
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

  def _check_model(self) -> None:
    bc = self.bert_config
    for phase in self.phases:
      where = f"--config.phases.{phase.index}"
      if phase.seq_len > bc.max_position_embeddings:
        raise UserError(f"{where}.seq_len={phase.seq_len} exceeds the model's "
                        f"max_position_embeddings={bc.max_position_embeddings}")
      if phase.batch_size % self.process_count:
        raise UserError(f"{where}.batch_size={phase.batch_size}: expected a multiple of the "
                        f"{self.process_count} processes")

  def _check_data(self) -> None:
    from bert_jax.data.pipeline import manifest
    bc = self.bert_config
    vocab_sha = hashlib.sha256(as_path(self.vocab).read_bytes()).hexdigest()
    for phase, data_dir in zip(self.phases, self.data_dirs):
      made_with = manifest(data_dir)["vocab"]
      data_vocab = made_with["size"]
      if data_vocab > bc.vocab_size or (self.cfg.init_from and data_vocab != bc.vocab_size):
        raise UserError(f"{data_dir}: made with a {data_vocab}-entry vocab, but the model's "
                        f"vocab_size is {bc.vocab_size}; the data and the model must share one "
                        "vocab")
      if made_with.get("sha256") not in (None, vocab_sha):
        raise UserError(f"{data_dir}: made with another vocab ({made_with.get('path')}, sha256 "
                        f"{made_with['sha256'][:12]}) than this run's {self.vocab} (sha256 "
                        f"{vocab_sha[:12]}); recreate the data with bert-jax create-data --vocab "
                        "of this run, or pretrain with the data's vocab (--config.data.vocab)")
      _check_shards(data_dir, f"--config.phases.{phase.index}.data")

  def _make_state(self, init_params: Any):
    import jax
    from bert_jax.steps import create_train_state
    rng = jax.random.fold_in(jax.random.PRNGKey(int(self.cfg.seed)), 0)
    return create_train_state(self.bert_config, self.cfg, self.mesh, rng,
                              init_params=init_params)

  # -- data --------------------------------------------------------------------------------------

  def _train_iterator(self, phase: Any, data_state: Any = None) -> Iterator[dict]:
    """Global device batches, built (data.worker_count processes) and copied to the devices
    data.prefetch batches ahead of the step, off the training thread."""
    from bert_jax.data.pipeline import make_iterator
    from bert_jax.sharding import global_batch
    mesh = self.mesh
    it = make_iterator(self.data_dirs[phase.index], split="train",
                       batch_size=phase.batch_size // self.process_count,
                       seq_len=phase.seq_len, max_predictions=phase.max_predictions,
                       seed=int(self.cfg.seed) + 1000 * phase.index, shuffle=True,
                       num_epochs=None, dynamic_masking=bool(self.cfg.data.dynamic_masking),
                       masked_lm_prob=float(self.cfg.data.masked_lm_prob),
                       process_index=self.process_index, process_count=self.process_count,
                       worker_count=int(self.cfg.data.worker_count),
                       prefetch=int(self.cfg.data.prefetch),
                       place=lambda host_batch: global_batch(host_batch, mesh))
    if data_state is not None:
      it.set_state(data_state)
    return it

  def _next_batch(self, phase: Any) -> dict:
    try:
      return next(self.iterator)
    except (RuntimeError, OSError) as e:  # a shard damaged after the set-up check
      raise UserError(f"--config.phases.{phase.index}.data={self.data_dirs[phase.index]}: "
                      f"cannot read a batch ({first_line(e)}); recreate the data with "
                      "bert-jax create-data") from None

  def _eval_batches(self, phase: Any) -> list[dict]:
    """A fixed list of held-out batches (the same every eval), or [] when there is none."""
    from bert_jax.data.pipeline import make_iterator, manifest
    if phase.index in self._eval_cache:
      return self._eval_cache[phase.index]
    batches: list[dict] = []
    info = manifest(self.data_dirs[phase.index])["splits"].get("eval")
    # The train micro-batch, or fewer rows for a small eval split; a multiple of the batch
    # shards (data x fsdp) and of the processes so that it splits evenly.
    unit = math.lcm(self.mesh.shape["data"] * self.mesh.shape["fsdp"], self.process_count)
    available = info["num_instances"] if info else 0
    size = min(phase.batch_size // phase.grad_accum, available) // unit * unit
    if size > 0 and self.cfg.eval_batches > 0:
      count = min(int(self.cfg.eval_batches), available // size)
      it = make_iterator(self.data_dirs[phase.index], split="eval",
                         batch_size=size // self.process_count, seq_len=phase.seq_len,
                         max_predictions=phase.max_predictions, seed=0, shuffle=False,
                         num_epochs=1, process_index=self.process_index,
                         process_count=self.process_count)
      for _ in range(count):
        try:
          batches.append(next(it))
        except StopIteration:
          break
    self._eval_cache[phase.index] = batches
    return batches

  # -- checkpoints --------------------------------------------------------------------------------

  def _save(self, step: int) -> bool:
    import jax
    data_state = self.iterator.get_state() if self.iterator is not None else None
    meta = dict(phase=self._phase_at(step).index, data_phase=self.phase.index,
                seed=int(self.cfg.seed), config_hash=self.config_hash,
                total_steps=int(self.cfg.total_steps), skipped_steps=self.skipped_total,
                process_count=jax.process_count(), time=time.time())
    saved = self.ckpt.save(step, params=self.state.params, opt_state=self.state.opt_state,
                           meta=meta, data_state=data_state)
    if saved:
      self.meter.restart_clock()
    return saved

  def _phase_at(self, step: int):
    from bert_jax.phases import phase_at
    return phase_at(self.phases, step)

  def _restore(self):
    """Resumes from the newest good checkpoint, if any. Returns (step, data state or None)."""
    import jax
    from bert_jax.checkpoint import abstract_like
    if not self.ckpt.all_steps():
      return 0, None
    restored = self.ckpt.restore(
        abstract_like(self.state.params), abstract_like(self.state.opt_state),
        want_data=lambda m: m.get("data_phase") == self._phase_at(int(m["step"])).index)
    if restored is None:
      warnings.warn(f"{self.ckpt.directory}: no checkpoint could be restored; starting from "
                    "step 0", stacklevel=2)
      return 0, None
    if restored.meta.get("config_hash") not in (None, self.config_hash):
      warnings.warn("resuming with a config that differs from the one that wrote checkpoint "
                    f"{restored.step} (see config.pretrain.json)", stacklevel=2)
    step_sharding = self.state.step.sharding
    self.state = self.state.replace(
        step=jax.device_put(jax.numpy.asarray(restored.step, jax.numpy.int32), step_sharding),
        params=restored.params, opt_state=restored.opt_state)
    self.skipped_total = int(restored.meta.get("skipped_steps", 0))
    return restored.step, restored.data_state

  # -- the loop -----------------------------------------------------------------------------------

  def run(self) -> int:
    import jax
    from bert_jax.checkpoint import Checkpointer
    from bert_jax.metric_writer import IntervalMetrics, MetricWriter
    from bert_jax.sharding import global_batch
    from bert_jax.steps import (jit_eval_step, make_eval_step, phase_train_step,
                                pretraining_loss)
    self._setup()
    cfg, phases = self.cfg, self.phases
    total = int(cfg.total_steps)
    c = cfg.checkpoint
    self.ckpt = Checkpointer(self.workdir, keep_last=int(c.keep_last),
                             keep_every=int(c.keep_every),
                             keep_steps=[p.end_step for p in phases],
                             async_save=bool(c.async_save))
    resuming = bool(self.ckpt.all_steps())
    self.state, shardings, optimizer, schedule = self._make_state(
        None if resuming else self.init_params)
    self.skipped_total = 0
    step, data_state = self._restore()
    if step == 0 and resuming and self.init_params is not None:  # nothing restorable
      self.state, shardings, optimizer, schedule = self._make_state(self.init_params)
    self.init_params = None
    writer = MetricWriter(self.workdir, enabled=self.is_writer,
                          resume_step=step if resuming else None)
    if step >= total:
      writer.message(f"already complete: step {step} of {total} in {self.workdir}")
      self.ckpt.close()
      writer.close()
      return 0
    writer.message(f"{'resuming at' if step else 'starting at'} step {step} of {total}; "
                   f"model {self.bert_config.num_hidden_layers} layers x "
                   f"{self.bert_config.hidden_size}, vocab {self.bert_config.vocab_size}; "
                   f"{jax.device_count()} device(s), mesh {dict(self.mesh.shape)}")
    flops_fn, peak_fn = _mfu_functions()
    peak = None
    if flops_fn is not None:
      try:
        per_device = peak_fn()
        peak = per_device * jax.device_count() if per_device else None
      except Exception:  # an unknown device: no MFU rather than no run
        peak = None
    base_rng = jax.random.fold_in(jax.random.PRNGKey(int(cfg.seed)), 1)
    eval_fn = jit_eval_step(make_eval_step(pretraining_loss(self.bert_config)), self.mesh,
                            shardings)
    self._eval_cache: dict[int, list] = {}
    self.meter = IntervalMetrics(resumed_at=step or None)
    self.phase, self.iterator = None, None
    train_fn = None
    preemption = Preemption()
    preemption.install()
    try:
      while step < total:
        phase = self._phase_at(step)
        if self.phase is None or phase.index != self.phase.index:
          self.phase = phase
          self._close_iterator()
          self.iterator = self._train_iterator(phase, data_state)
          data_state = None
          train_fn = phase_train_step(self.bert_config, cfg, phase, optimizer, schedule,
                                      self.mesh, shardings)
          first_step_of_phase = True
          flops_per_step = (flops_fn(self.bert_config, phase.seq_len, phase.max_predictions)
                            * phase.batch_size if flops_fn is not None else None)
        waited = time.perf_counter()
        batch = self._next_batch(phase)
        self.meter.add_data_wait(time.perf_counter() - waited)
        batch_shape = [phase.batch_size, int(batch["input_ids"].shape[1])]
        if first_step_of_phase:
          writer.message(f"phase {phase.index + 1}/{len(phases)}: steps {phase.start_step}-"
                         f"{phase.end_step}, batch {batch_shape} (x{phase.grad_accum} "
                         f"accumulation), {phase.max_predictions} predictions; compiling "
                         "its train step")
        self.meter.dispatching()
        self.state, metrics = train_fn(self.state, batch, base_rng)
        step += 1
        self.meter.add(step, metrics)
        if first_step_of_phase:  # compile time is not training time
          jax.block_until_ready(metrics)
          self.meter.restart_clock()
          first_step_of_phase = False

        phase_end = step == phase.end_step
        stop_at = None
        if cfg.nan_policy == "stop":
          due = (phase_end or (c.every_steps and step % c.every_steps == 0)
                 or (cfg.log_every and step % cfg.log_every == 0)
                 or (cfg.eval_every and step % cfg.eval_every == 0) or preemption.requested)
          if due:
            stop_at = self.meter.first_nonfinite_step()
        if stop_at is not None:
          return self._stop_nonfinite(stop_at, writer)
        if phase_end or (cfg.log_every and step % cfg.log_every == 0):
          row = self.meter.summary(sequences_per_step=phase.batch_size,
                                   tokens_per_step=phase.batch_size * phase.seq_len,
                                   flops_per_step=flops_per_step, peak_flops=peak)
          self.skipped_total += row["skipped_steps"]
          row.update(skipped_total=self.skipped_total, batch_size=phase.batch_size,
                     batch_shape=batch_shape)
          writer.write(step, row, phase=phase.index, seq_len=batch_shape[1])
        if phase_end or (cfg.eval_every and step % cfg.eval_every == 0):
          self._evaluate(step, phase, eval_fn, writer, global_batch)
        preempted = preemption.requested or (
            self.process_count > 1 and self._reached_preemption(step))
        if phase_end or preempted or (c.every_steps and step % c.every_steps == 0):
          self._save(step)
        if preempted and step < total:
          self.ckpt.wait()
          writer.message(f"preempted: saved checkpoint at step {step} in "
                         f"{self.ckpt.directory}; rerun the same command to resume")
          return 0
      self.ckpt.wait()
      writer.message(f"done: step {step}; final checkpoint {self.ckpt.directory / str(step)}")
      return 0
    finally:
      preemption.uninstall()
      self._close_iterator()
      self.ckpt.close()
      writer.close()

  def _close_iterator(self) -> None:
    """Stops the prefetch thread and the worker processes of the current phase's data."""
    if self.iterator is not None:
      self.iterator.close()

  def _reached_preemption(self, step: int) -> bool:
    try:
      return self.ckpt.reached_preemption(step)
    except Exception:  # no preemption service (e.g. not launched by a cluster manager)
      return False

  def _evaluate(self, step: int, phase: Any, eval_fn: Any, writer: Any, global_batch) -> None:
    import jax
    batches = self._eval_batches(phase)
    if not batches:
      return
    results = jax.device_get([eval_fn(self.state.params, global_batch(b, self.mesh))
                              for b in batches])
    mlm_w = sum(float(r["mlm_weight"]) for r in results)
    seqs = sum(float(r["num_sequences"]) for r in results)
    row = {}
    for key, weight in (("mlm_loss", "mlm_weight"), ("mlm_accuracy", "mlm_weight"),
                        ("nsp_loss", "num_sequences"), ("nsp_accuracy", "num_sequences")):
      den = mlm_w if weight == "mlm_weight" else seqs
      row[key] = sum(float(r[key]) * float(r[weight]) for r in results) / max(den, 1e-9)
    row["loss"] = row["mlm_loss"] + row["nsp_loss"]
    row["eval_sequences"] = int(seqs)
    writer.write(step, row, split="eval", phase=phase.index, seq_len=phase.seq_len)
    self.meter.restart_clock()

  def _stop_nonfinite(self, bad_step: int, writer: Any) -> int:
    self.ckpt.wait()
    last = self.ckpt.latest_step()
    print(f"error: non-finite loss or gradient at step {bad_step} (nan_policy=stop); "
          f"stopping without saving. The last good checkpoint is "
          f"{'step ' + str(last) if last is not None else 'none'} in {self.ckpt.directory}",
          file=sys.stderr, flush=True)
    writer.flush()
    return EXIT_NONFINITE


def pretrain(cfg: ml_collections.ConfigDict, workdir: str) -> int:
  """Runs (or resumes) the whole schedule in `workdir`; returns the process exit code."""
  check_writable(workdir, "--workdir")
  trainer = Trainer(cfg, workdir)
  try:
    return trainer.run()
  finally:
    trainer.lock.release()


@cli_entry
def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  config_spec, workdir, overrides = parse_args(argv)
  cfg = resolve_config(config_spec, overrides)
  return pretrain(cfg, workdir)


if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()
  sys.exit(main())
