"""`bert-jax pretrain`: the pretraining loop (phases, metrics, checkpoints, preemption).

  bert-jax pretrain --config configs/X.py[:arg] --workdir DIR [--config.a.b=value ...]

One global step counter; `phase_at(step)` picks the sequence length, predictions, batch and data
of each step; one compiled train step per phase. A phase boundary saves a checkpoint and
switches the data iterator. Rerunning in the same workdir resumes from the newest complete
checkpoint; SIGTERM (a TPU preemption) finishes the step, saves and exits 0. The rng of step s
is fold_in(base, s) and the data-iterator state is checkpointed, so a resumed run computes the
same parameters as an uninterrupted one. The workdir (vocab, data, model config) is prepared
by bert_jax.pretraining.workdir before the loop starts.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Any, Iterator

import jax
import ml_collections

from bert_jax.data.pipeline import make_iterator
from bert_jax.devices import hostmem, mfu, platforms, xla_cache
from bert_jax.errors import UserError, cli_entry, first_line
from bert_jax.modeling import attention, kernel_check
from bert_jax.pretraining.metric_writer import IntervalMetrics, MetricWriter
from bert_jax.pretraining.run_config import objective_of, parse_args, remat_of, resolve_config
from bert_jax.pretraining.workdir import (REMAT_RECORD, load_init_params, prepare_workdir,
                                          record_remat_floor)
from bert_jax.storage.checkpoint import Checkpointer
from bert_jax.storage.fileio import as_path, check_writable
from bert_jax.training.phases import Phase, make_phases, phase_at
from bert_jax.training.remat import NAMES
from bert_jax.training import sharding  # sharding.global_batch looked up per call (tests swap it)
from bert_jax.training.lock import DirLock
from bert_jax.training.preemption import Preemption
from bert_jax.training.state import TrainState
from bert_jax.training.steps import Pretraining, eval_metrics

EXIT_NONFINITE = 3  # the run stopped on a non-finite loss (nan_policy=stop)
EXIT_OUT_OF_MEMORY = 1  # a step ran out of device memory after taking the state; rerun resumes


class _StateLost(Exception):
  """A step that ran out of device memory had already taken (donated) the train state."""


def _mesh_peak_flops() -> float | None:
  """Peak FLOP/s of all devices, None for a device without a known peak (no MFU then)."""
  try:
    per_device = mfu.peak_flops_per_device()
  except Exception:  # an unknown device: no MFU rather than no run
    return None
  return per_device * jax.device_count() if per_device else None


def _every(interval: int, step: int) -> bool:
  return bool(interval) and step % interval == 0


class Trainer:
  """The pretraining loop over one workdir; `run()` returns the exit code."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
    self.cfg = cfg
    self.workdir = str(as_path(workdir))  # absolute if local; a gs:// URI stays as it is
    self.lock = DirLock(self.workdir, "--workdir")
    self.phase, self.iterator = None, None

  # -- the loop -----------------------------------------------------------------------------------

  def run(self) -> int:
    init_params = self._setup()
    total = int(self.cfg.total_steps)
    step, data_state = self._start_state(init_params)
    del init_params  # the state holds them now
    self.writer = MetricWriter(self.workdir, enabled=self.is_writer,
                               resume_step=step if self.resuming else None)
    if step >= total:
      self.writer.message(f"already complete: step {step} of {total} in {self.workdir}")
      self.ckpt.close()
      self.writer.close()
      return 0
    mc = self.plan.model_config
    self.writer.message(f"{'resuming at' if step else 'starting at'} step {step} of {total}; "
                        f"model {mc.num_hidden_layers} layers x {mc.hidden_size}, vocab "
                        f"{mc.vocab_size}; {jax.device_count()} device(s), mesh "
                        f"{dict(self.mesh.shape)}")
    device = self.mesh.devices.flat[0]
    self.writer.message(f"{platforms.describe_dtype(str(self.cfg.model.dtype), device)}; "
                        + attention.describe(mc.attention, device.platform,
                                             mc.attention_probs_dropout_prob, mc.dtype))
    if self.kernel_checked:
      self.writer.message(self.kernel_checked)
    self._prepare_loop(step)
    self.preemption = Preemption()
    self.preemption.install()
    try:
      while step < total:
        phase = self._phase_at(step)
        if self.phase is None or phase.index != self.phase.index:
          self._begin_phase(phase, data_state)
          data_state = None
        try:
          step = self._run_step(phase, step)
        except _StateLost:
          return self._stop_out_of_memory(phase, step)
        exit_code = self._after_step(phase, step, total)
        if exit_code is not None:
          return exit_code
      self.ckpt.wait()
      self.writer.message(f"done: step {step}; final checkpoint {self.ckpt.directory / str(step)}")
      return 0
    finally:
      self.preemption.uninstall()
      self._close_iterator()
      self.ckpt.close()
      self.writer.close()

  def _begin_phase(self, phase: Phase, data_state: Any) -> None:
    """A new phase (or the first of this run): its data iterator and compiled step."""
    self.phase = phase
    self._close_iterator()
    self.iterator = self._train_iterator(phase, data_state)
    self.train_step = self.pretraining.train_step(phase)
    choice = self.pretraining.remat_choices.get(phase.index)
    if choice:
      self.writer.message(f"phase {phase.index + 1}: {choice.describe()} (model.remat auto)")
    self.first_step_of_phase = True
    self.flops_per_step = (mfu.train_flops_per_sequence(
        self.plan.model_config, phase.seq_len, phase.max_predictions) * phase.batch_size)

  def _run_step(self, phase: Phase, step: int) -> int:
    """One step of `phase`; returns the step count after it."""
    waited = time.perf_counter()
    batch = self._next_batch(phase)
    self.meter.add_data_wait(time.perf_counter() - waited)
    self.batch_shape = [phase.batch_size, int(batch["input_ids"].shape[1])]
    if self.first_step_of_phase:
      self.writer.message(f"phase {phase.index + 1}/{len(self.plan.phases)}: steps "
                          f"{phase.start_step}-{phase.end_step}, batch {self.batch_shape} "
                          f"(x{phase.grad_accum} accumulation), {phase.max_predictions} "
                          "predictions; compiling its train step")
    self.meter.dispatching()
    self.state, metrics = self._step_or_recompute(phase, batch)
    step += 1
    self.meter.add(step, metrics)
    if self.first_step_of_phase:  # compile time is not training time
      jax.block_until_ready(metrics)
      self.meter.restart_clock()
      self.first_step_of_phase = False
    return step

  def _step_or_recompute(self, phase: Phase, batch: dict) -> tuple[TrainState, dict]:
    """The train step on `batch`. Where it runs out of device memory at a remat level that
    model.remat auto chose below full, the phase recomputes more from now on (remat.json
    records it for later starts) and the same batch runs again; _StateLost if the failed step
    had taken the state."""
    try:
      out = self.train_step(self.state, batch, self.base_rng)
      if self.first_step_of_phase:  # a step that does not fit fails here
        jax.block_until_ready(out)
      return out
    except Exception as e:  # XLA's RESOURCE_EXHAUSTED comes as a runtime error
      before = self.pretraining.remat(phase)
      if not (mfu.out_of_memory(e) and self.pretraining.recompute(phase)):
        raise
      error = first_line(e, 160)
    level = self.pretraining.remat(phase)
    if self.is_writer:
      record_remat_floor(self.workdir, phase.index, level)
    self.writer.message(f"phase {phase.index + 1}: ran out of device memory with remat "
                        f"{NAMES[before]} ({error}); remat {NAMES[level]} from now on "
                        f"({REMAT_RECORD})")
    if any(x.is_deleted() for x in jax.tree.leaves(self.state)):
      raise _StateLost
    self.train_step = self.pretraining.train_step(phase)
    return self.train_step(self.state, batch, self.base_rng)

  def _stop_out_of_memory(self, phase: Phase, step: int) -> int:
    self.ckpt.wait()
    last = self.ckpt.latest_step()
    print(f"error: phase {phase.index + 1}'s step ran out of device memory and took the train "
          f"state with it; {self.workdir}/{REMAT_RECORD} now gives the phase remat "
          f"{NAMES[self.pretraining.remat(phase)]}: rerun the same command to resume from "
          f"{'step ' + str(last) if last is not None else 'the start'}", file=sys.stderr,
          flush=True)
    self.writer.flush()
    return EXIT_OUT_OF_MEMORY

  def _after_step(self, phase: Phase, step: int, total: int) -> int | None:
    """The events due after `step`, in order; an exit code when the run ends here."""
    self.ckpt.check()  # an async save that failed (a full disk) stops the run here
    cfg, every_checkpoint = self.cfg, int(self.cfg.checkpoint.every_steps)
    phase_end = step == phase.end_step
    log_due, eval_due = _every(cfg.log_every, step), _every(cfg.eval_every, step)
    if cfg.nan_policy == "stop" and (phase_end or _every(every_checkpoint, step) or log_due
                                     or eval_due or self.preemption.requested):
      bad_step = self.meter.first_nonfinite_step()
      if bad_step is not None:
        return self._stop_nonfinite(bad_step)
    if phase_end or log_due:
      self._log_row(phase, step)
    if phase_end or eval_due:
      self._evaluate(phase, step)
    preempted = self.preemption.requested or (
        self.process_count > 1 and self._reached_preemption(step))
    if phase_end or preempted or _every(every_checkpoint, step):
      self._save(step)
    if preempted and step < total:
      return self._stop_preempted(step)
    return None

  # -- set-up -------------------------------------------------------------------------------------

  def _setup(self) -> Any:
    """Distributed start, the workdir's lock and plan, the mesh; returns the init params."""
    sharding.initialize_distributed()
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    self.is_writer = self.process_index == 0
    as_path(self.workdir).mkdir(parents=True, exist_ok=True)
    if self.is_writer:  # process 0 holds it for all hosts (best-effort on gs://, see lock.py)
      self.lock.acquire()
    self.plan, init_params = prepare_workdir(
        self.cfg, self.workdir, process_count=self.process_count, is_writer=self.is_writer,
        phases=make_phases(self.cfg))
    self.mesh = sharding.make_mesh(int(self.cfg.mesh.data), int(self.cfg.mesh.fsdp),
                                   int(self.cfg.mesh.tensor))
    sharding.check_batches_split(self.plan.phases, self.mesh)
    # before any state is built: a kernel compiled wrongly for this device stops the run here
    self.kernel_checked = kernel_check.verify(self.plan.model_config,
                                              [p.seq_len for p in self.plan.phases])
    return init_params

  def _start_state(self, init_params: Any) -> tuple[int, Any]:
    """The train state to start from: the newest good checkpoint's, else a fresh one (from
    init_from's weights when given; loaded here only if the plan did not load them, i.e. it
    saw checkpoints that turned out unrestorable). Returns (step, data-iterator state or
    None)."""
    c = self.cfg.checkpoint
    self.ckpt = Checkpointer(self.workdir, keep_last=int(c.keep_last),
                             keep_every=int(c.keep_every),
                             keep_steps=[p.end_step for p in self.plan.phases],
                             async_save=bool(c.async_save))
    self.pretraining = Pretraining(self.plan.model_config, self.cfg, self.mesh, self.plan.phases,
                                   objective_of(self.cfg), auto_remat=remat_of(self.cfg) == "auto",
                                   remat_floors=self.plan.remat_floors)
    self.resuming = bool(self.ckpt.all_steps())
    self.skipped_total = 0
    step, data_state = self._restore()
    if step == 0:
      if init_params is None:  # None again without init_from
        init_params = load_init_params(self.cfg)
      rng = jax.random.fold_in(jax.random.PRNGKey(int(self.cfg.seed)), 0)
      self.state = self.pretraining.init_state(rng, init_params)
    return step, data_state

  def _prepare_loop(self, step: int) -> None:
    self.base_rng = jax.random.fold_in(jax.random.PRNGKey(int(self.cfg.seed)), 1)
    self.peak_flops = _mesh_peak_flops()
    self._eval_cache: dict[int, list] = {}
    self.meter = IntervalMetrics(resumed_at=step or None)

  # -- data --------------------------------------------------------------------------------------

  def _train_iterator(self, phase: Phase, data_state: Any = None) -> Iterator[dict]:
    """Global device batches, built (data.worker_count processes) and copied to the devices
    data.prefetch batches ahead of the step, off the training thread."""
    mesh = self.mesh
    it = make_iterator(self.plan.data_dirs[phase.index], split="train",
                       batch_size=phase.batch_size // self.process_count,
                       seq_len=phase.seq_len, max_predictions=phase.max_predictions,
                       seed=int(self.cfg.seed) + 1000 * phase.index, shuffle=True,
                       num_epochs=None, dynamic_masking=bool(self.cfg.data.dynamic_masking),
                       masked_lm_prob=float(self.cfg.data.masked_lm_prob),
                       process_index=self.process_index, process_count=self.process_count,
                       worker_count=int(self.cfg.data.worker_count),
                       prefetch=int(self.cfg.data.prefetch),
                       place=lambda host_batch: sharding.global_batch(host_batch, mesh),
                       man=self.plan.manifests[phase.index])
    if data_state is not None:
      it.set_state(data_state)
    return it

  def _next_batch(self, phase: Phase) -> dict:
    try:
      return next(self.iterator)
    except (RuntimeError, OSError) as e:  # a shard damaged after the set-up check
      raise UserError(f"--config.phases.{phase.index}.data="
                      f"{self.plan.data_dirs[phase.index]}: cannot read a batch "
                      f"({first_line(e)}); recreate the data with bert-jax create-data"
                      ) from None

  def _close_iterator(self) -> None:
    """Stops the prefetch thread and the worker processes of the current phase's data."""
    if self.iterator is not None:
      self.iterator.close()

  def _eval_batches(self, phase: Phase) -> list[dict]:
    """A fixed list of held-out batches (the same every eval), or [] when there is none."""
    if phase.index in self._eval_cache:
      return self._eval_cache[phase.index]
    batches: list[dict] = []
    man = self.plan.manifests[phase.index]
    info = man["splits"].get("eval")
    # The train micro-batch, or fewer rows for a small eval split; a multiple of the batch
    # shards (data x fsdp) and of the processes so that it splits evenly.
    unit = math.lcm(self.mesh.shape["data"] * self.mesh.shape["fsdp"], self.process_count)
    available = info["num_instances"] if info else 0
    size = min(phase.batch_size // phase.grad_accum, available) // unit * unit
    if size > 0 and self.cfg.eval_batches > 0:
      count = min(int(self.cfg.eval_batches), available // size)
      it = make_iterator(self.plan.data_dirs[phase.index], split="eval",
                         batch_size=size // self.process_count, seq_len=phase.seq_len,
                         max_predictions=phase.max_predictions, seed=0, shuffle=False,
                         masked_lm_prob=float(self.cfg.data.masked_lm_prob),  # unmasked data
                         num_epochs=1, process_index=self.process_index,
                         process_count=self.process_count, man=man)
      for _ in range(count):
        try:
          batches.append(next(it))
        except StopIteration:
          break
    self._eval_cache[phase.index] = batches
    return batches

  # -- events -------------------------------------------------------------------------------------

  def _log_row(self, phase: Phase, step: int) -> None:
    row = self.meter.summary(sequences_per_step=phase.batch_size,
                             tokens_per_step=phase.batch_size * phase.seq_len,
                             flops_per_step=self.flops_per_step, peak_flops=self.peak_flops)
    self.skipped_total += row["skipped_steps"]
    row.update(skipped_total=self.skipped_total, batch_size=phase.batch_size,
               batch_shape=self.batch_shape)
    self.writer.write(step, row, phase=phase.index, seq_len=self.batch_shape[1])

  def _evaluate(self, phase: Phase, step: int) -> None:
    batches = self._eval_batches(phase)
    if not batches:
      return
    sums = jax.device_get([
        self.pretraining.eval_step(self.state.params, sharding.global_batch(b, self.mesh))
        for b in batches])
    row = eval_metrics(self.pretraining.loss, sums)   # means over all the eval batches
    del row["mlm_weight"]
    row["eval_sequences"] = int(row.pop("num_sequences"))
    self.writer.write(step, row, split="eval", phase=phase.index, seq_len=phase.seq_len)
    self.meter.restart_clock()

  def _save(self, step: int) -> bool:
    data_state = self.iterator.get_state() if self.iterator is not None else None
    meta = dict(phase=self._phase_at(step).index, data_phase=self.phase.index,
                seed=int(self.cfg.seed), config_hash=self.plan.config_hash,
                total_steps=int(self.cfg.total_steps), skipped_steps=self.skipped_total,
                process_count=jax.process_count(), time=time.time())
    saved = self.ckpt.save(step, params=self.state.params, opt_state=self.state.opt_state,
                           meta=meta, data_state=data_state)
    if saved:
      self.meter.restart_clock()
    return saved

  def _reached_preemption(self, step: int) -> bool:
    try:
      return self.ckpt.reached_preemption(step)
    except Exception:  # no preemption service (e.g. not launched by a cluster manager)
      return False

  def _stop_preempted(self, step: int) -> int:
    self.ckpt.wait()
    self.writer.message(f"preempted: saved checkpoint at step {step} in "
                        f"{self.ckpt.directory}; rerun the same command to resume")
    return 0

  def _stop_nonfinite(self, bad_step: int) -> int:
    self.ckpt.wait()
    last = self.ckpt.latest_step()
    print(f"error: non-finite loss or gradient at step {bad_step} (nan_policy=stop); "
          f"stopping without saving. The last good checkpoint is "
          f"{'step ' + str(last) if last is not None else 'none'} in {self.ckpt.directory}",
          file=sys.stderr, flush=True)
    self.writer.flush()
    return EXIT_NONFINITE

  # -- checkpoints --------------------------------------------------------------------------------

  def _phase_at(self, step: int) -> Phase:
    return phase_at(self.plan.phases, step)

  def _restore(self) -> tuple[int, Any]:
    """Resumes from the newest good checkpoint, if any. Returns (step, data state or None)."""
    if not self.resuming:
      return 0, None
    abstract = self.pretraining.abstract_state
    restored = self.ckpt.restore(
        abstract.params, abstract.opt_state,
        want_data=lambda m: m.get("data_phase") == self._phase_at(int(m["step"])).index)
    if restored is None:
      warnings.warn(f"{self.ckpt.directory}: no checkpoint could be restored; starting from "
                    "step 0", stacklevel=2)
      return 0, None
    if restored.meta.get("config_hash") not in (None, self.plan.config_hash):
      warnings.warn("resuming with a config that differs from the one that wrote checkpoint "
                    f"{restored.step} (see config.pretrain.json)", stacklevel=2)
    step = jax.device_put(jax.numpy.asarray(restored.step, jax.numpy.int32),
                          self.pretraining.shardings.step)
    self.state = TrainState(step=step, params=restored.params, opt_state=restored.opt_state)
    self.skipped_total = int(restored.meta.get("skipped_steps", 0))
    return restored.step, restored.data_state


def pretrain(cfg: ml_collections.ConfigDict, workdir: str) -> int:
  """Runs (or resumes) the whole schedule of a validated `cfg` (run_config.resolve_config) in
  `workdir`; returns the process exit code."""
  platforms.check_install("pretrain")
  check_writable(workdir, "--workdir")
  xla_cache.enable(xla_cache.default_dir())  # a resume after preemption skips the compile
  trainer = Trainer(cfg, workdir)
  try:
    return trainer.run()
  finally:
    trainer.lock.release()


@cli_entry
def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  config_spec, workdir, overrides = parse_args(argv)
  return pretrain(resolve_config(config_spec, overrides), workdir)


if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()
  sys.exit(main())
