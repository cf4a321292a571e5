"""The on-disk layout of bert-jax checkpoints, both kinds, and the one way they are read back.

A pretraining workdir (written by `Checkpointer`, an orbax CheckpointManager):

  workdir/checkpoints/<step>/params     orbax StandardSave of the float32 params pytree
  workdir/checkpoints/<step>/opt_state  orbax StandardSave of the optax state
  workdir/checkpoints/<step>/meta       JSON: step, phase, seed, config hash, params fingerprint
  workdir/checkpoints/<step>/data       grain's orbax handler: process_<i>-of-<n>.json, each
                                        process's data-iterator state as JSON
  workdir/config.json, workdir/vocab.txt

An exported checkpoint (`write_checkpoint`: bert-jax-convert from-hf, fine-tuning's best model):

  dir/params                            the same params item as a step's
  dir/config.json, dir/vocab.txt, dir/tokenizer_config.json (do_lower_case)

Both readers, `Checkpointer.restore` (resuming) and `load_checkpoint` (load_pretrained, to-hf),
try the newest step first and pass over a damaged one to the step before (integrity.py).
Orbax writes each step into a temporary directory and renames it when complete, so a save cut
short by SIGKILL never looks like a step. A step that is there but damaged (files deleted or
truncated, an item missing) fails to restore or fails the params fingerprint check;
`Checkpointer.restore` warns and renames it <step>.corrupt-<time>, out of the way of the
resumed run's saves.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import pathlib
import shutil
import sys
import time
import warnings
from typing import Any, Callable, Sequence, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from grain.python import PyGrainCheckpointRestore, PyGrainCheckpointSave

from bert_jax.config import BertConfig, find_config, write_config_json
from bert_jax.errors import UserError, drop_closed_loop_noise
from bert_jax.storage.fileio import new_directory, resolved, write_json_atomic
from bert_jax.storage.integrity import (check_fingerprint, first_restorable,
                                        fingerprint_is_finite, params_fingerprint,
                                        structure_mismatch)

CHECKPOINTS = "checkpoints"
PARAMS = "params"
ITEMS = (PARAMS, "opt_state", "meta", "data")
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# The data item, through grain's own handler (each host reads its own shard, so each process
# writes its own file).

class _IteratorState:
  """What grain's handler saves from and restores into, in place of the data iterator.

  The handler writes `get_state()` of a grain DataLoader iterator (JSON bytes) and restores by
  calling `set_state()` and `start_prefetch()` on the iterator handed to it. The training loop
  makes its iterator only once the restored step has said which phase it is in, so there is
  none to hand over yet: this carries the state (a JSON value, or the bytes of one) instead.
  """

  def __init__(self, state: Any = None):
    self.state = state

  def get_state(self) -> bytes:
    if isinstance(self.state, (bytes, str)):
      return self.state.encode() if isinstance(self.state, str) else self.state
    return json.dumps(self.state).encode()

  def set_state(self, state: bytes) -> None:
    self.state = _from_own_handler(json.loads(state))

  def start_prefetch(self) -> None:
    """Nothing to start: the iterator that takes this state starts its own workers."""


def _from_own_handler(state: Any) -> Any:
  """A state as bert-jax's own handler wrote it before grain's was used, at the same file
  names: {"kind": "json", "value": state} or {"kind": "bytes", "value": JSON text}."""
  if isinstance(state, dict) and set(state) == {"kind", "value"}:
    return json.loads(state["value"]) if state["kind"] == "bytes" else state["value"]
  return state


def disk_full_error(error: BaseException, path: epath.Path) -> UserError | None:
  """A one-line UserError naming `path` and the free space there when `error`, or what it
  was raised from, is a full disk or quota; None for any other error."""
  seen: BaseException | None = error
  while seen is not None:
    if ((isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT))
        or "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen)):
      probe = pathlib.Path(path)
      while not probe.exists() and probe != probe.parent:
        probe = probe.parent
      try:
        free = f"{shutil.disk_usage(probe).free / 2**20:,.0f} MiB free"
      except OSError:
        free = "free space unknown"
      return UserError(f"{path}: no space left on device ({free} in {probe})")
    seen = seen.__cause__ or seen.__context__
  return None


# --------------------------------------------------------------------------------- training

@dataclasses.dataclass
class Restored:
  step: int
  params: Any
  opt_state: Any
  meta: dict
  data_state: Any  # a JSON value; None when the caller asked for none (a finished phase's)


class Checkpointer:
  """Async orbax CheckpointManager under workdir/checkpoints, keeping the last N and every Kth.

  `keep_steps` (e.g. phase boundaries) are kept as well. Saves are forced at the steps the
  caller chooses; the manager's own save interval is not used.
  """

  def __init__(self, workdir: str, *, keep_last: int = 3, keep_every: int = 0,
               keep_steps: Sequence[int] = (), async_save: bool = True):
    self.directory = epath.Path(workdir) / CHECKPOINTS
    policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=max(1, keep_last))]
    if keep_every > 0:
      policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=keep_every))
    if keep_steps:
      policies.append(ocp.checkpoint_managers.CustomSteps(steps=list(keep_steps)))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # leftovers of a save that was killed mid-way
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self.failed_save: UserError | None = None

  def _guarded(self, call: Callable[[], T], step: int | None = None) -> T:
    """`call` (a save, or a wait for an async one), with a full disk as one UserError naming
    the step's directory and the free space: the run stops at the failed save."""
    try:
      return call()
    except Exception as e:
      full = disk_full_error(e, self.directory / str(step) if step is not None
                             else self.directory)
      if full is None:
        raise
      # The run stops here; the failed save's other writes (orbax threads) fail too and would
      # each log a traceback under the one line.
      logging.getLogger("absl").setLevel(logging.CRITICAL)
      drop_closed_loop_noise()
      last = [s for s in self.all_steps() if s != step]
      self.failed_save = UserError(
          f"{full}: checkpoint not saved; the last complete one is "
          f"{'step ' + str(last[-1]) if last else 'none'}. Free space (or lower "
          "--config.checkpoint.keep_last) and rerun the same command to resume")
      raise self.failed_save from None

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, *, params: Any, opt_state: Any, meta: dict,
           data_state: Any = None) -> bool:
    """Starts an (async) save of `step`; returns False, saving nothing, if params are not finite.

    `meta` must be JSON-serialisable; the params fingerprint is added to it. `data_state` is
    the data iterator's get_state(): a JSON-serialisable value, or the bytes of its JSON.
    """
    fingerprint = params_fingerprint(params)
    if not fingerprint_is_finite(fingerprint):
      warnings.warn(f"step {step}: parameters are not finite; checkpoint not written "
                    f"(the last good one, step {self.latest_step()}, is kept)", stacklevel=2)
      return False
    if step in self.manager.all_steps():
      return True  # already saved (e.g. the final step after a boundary save at the same step)
    meta = dict(meta, step=int(step), fingerprint=fingerprint)
    self._guarded(lambda: self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta),
        data=PyGrainCheckpointSave(_IteratorState(data_state))), force=True), step)
    return True

  def check(self) -> None:
    """Raises the failure of an async save that has ended (a full disk: one UserError)."""
    self._guarded(self.manager.check_for_errors)

  def restore(self, abstract_params: Any, abstract_opt_state: Any,
              want_data: Callable[[dict], bool] = lambda meta: True) -> Restored | None:
    """Restores the newest step that restores cleanly; None when there is none.

    `abstract_*` are pytrees of jax.ShapeDtypeStruct (with shardings) giving structure and
    placement. `want_data(meta)` says whether the data-iterator state of that step is needed;
    it comes back as a JSON value (what the iterator's set_state takes).
    """
    found, damaged = first_restorable(reversed(self.all_steps()), lambda step: (
        self._restore_checked_step(step, abstract_params, abstract_opt_state, want_data)))
    for step, why in damaged:
      warnings.warn(f"checkpoint {self.directory / str(step)} is incomplete or corrupt "
                    f"({why}); falling back to the one before", stacklevel=2)
    if damaged:
      self._set_aside([step for step, _ in damaged])
    return found[1] if found else None

  def _set_aside(self, steps: list[int]) -> None:
    """Renames damaged steps to <step>.corrupt-<time> (kept for inspection, no longer a step),
    so the resumed run can save those steps again."""
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        src = self.directory / str(step)
        if src.exists():
          src.rename(self.directory / f"{step}.corrupt-{stamp}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("bert_jax_checkpoint_set_aside")
    self.manager.reload()

  def _restore_checked_step(self, step: int, abstract_params: Any, abstract_opt_state: Any,
                            want_data: Callable[[dict], bool]) -> Restored:
    """_restore_step; a step that fails because it was written for another model or optimizer
    is a UserError (exit 2, the step left as it is), not damage to fall back past."""
    try:
      return self._restore_step(step, abstract_params, abstract_opt_state, want_data)
    except Exception:
      for item, abstract in ((PARAMS, abstract_params), ("opt_state", abstract_opt_state)):
        why = structure_mismatch(self.directory / str(step) / item, abstract)
        if why:
          raise UserError(
              f"{self.directory / str(step)}: its {item} were written for another model or "
              f"optimizer config ({why}); it is not damaged and was left as it is. Resume with "
              "the config it was written with (config.pretrain.json), or use a new --workdir"
              ) from None
      raise

  def _restore_step(self, step: int, abstract_params: Any, abstract_opt_state: Any,
                    want_data: Callable[[dict], bool]) -> Restored:
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = dict(meta["meta"])
    if int(meta.get("step", -1)) != step:
      raise ValueError(f"meta step {meta.get('step')} != directory step {step}")
    state = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state)))
    check_fingerprint(meta, state["params"])
    data = _IteratorState()
    if want_data(meta):
      self.manager.restore(step, args=ocp.args.Composite(data=PyGrainCheckpointRestore(data)))
    return Restored(step, state["params"], state["opt_state"], meta, data.state)

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption sync point (all hosts agree on the step to stop at)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self._guarded(self.manager.wait_until_finished)

  def close(self) -> None:
    reported = self.failed_save is not None
    try:
      self.wait()
      self.manager.close()
    except Exception:
      if not reported:  # else the failed save was reported: one line is enough
        raise


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with the arrays' shardings) for a pytree of jax arrays."""
  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(one, tree)


def _step_dirs(directory: epath.Path) -> list[epath.Path]:
  """The steps of a checkpoints/ directory, newest first (orbax's temporary directories and
  set-aside damaged steps are not steps)."""
  if not directory.is_dir():
    return []
  return [d for _, d in sorted(((int(d.name), d) for d in directory.iterdir()
                                if d.name.isdigit()), reverse=True)]


def workdir_has_checkpoint(workdir: str) -> bool:
  return bool(_step_dirs(epath.Path(workdir) / CHECKPOINTS))


# --------------------------------------------------------------------------------- exported

def checkpoint_params_dirs(path: str | os.PathLike) -> list[epath.Path]:
  """The params items of an exported checkpoint, a step or a workdir (local or gs://),
  newest first."""
  p = resolved(path)
  if (p / PARAMS).is_dir():
    return [p / PARAMS]
  root = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
  return [d / PARAMS for d in _step_dirs(root) if (d / PARAMS).is_dir()]


def restore_params(params_dir: str | os.PathLike) -> dict:
  """A params item as float32 numpy arrays, placed nowhere (any device count reads it)."""
  with ocp.StandardCheckpointer() as ckptr:
    return _as_float32(ckptr.restore(resolved(params_dir)))


def _restore_checked(params_dir: epath.Path) -> dict:
  """restore_params, with a training step's fingerprint check as Checkpointer.restore makes."""
  params = restore_params(params_dir)
  meta_dir = params_dir.parent / "meta"
  if meta_dir.is_dir():
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
      check_fingerprint(ckptr.restore(meta_dir), params)
  return params


def load_checkpoint(path: str | os.PathLike) -> tuple[BertConfig, dict, epath.Path]:
  """(config, params, params dir) of the newest restorable params under `path`; a damaged
  newest step is passed over with a warning on stderr."""
  candidates = checkpoint_params_dirs(path)
  if not candidates:
    raise UserError(f"{path}: no params/ checkpoint found; expected a bert-jax checkpoint, a "
                    "pretraining workdir, or a Hugging Face BERT directory")
  config = find_config(candidates[0].parent)
  if config is None:
    raise UserError(f"{path}: no config.json beside the checkpoint or in its parents")
  found, damaged = first_restorable(candidates, _restore_checked)
  last = None if found else damaged.pop()
  for params_dir, why in damaged:
    print(f"warning: {params_dir}: cannot restore ({why}); using the one before",
          file=sys.stderr)
  if last is not None:
    raise UserError(f"{last[0]}: cannot restore checkpoint ({last[1]})")
  params_dir, params = found
  return config, params, params_dir


def write_checkpoint(ckpt_dir: str | os.PathLike, config: BertConfig, params: dict,
                     vocab_path: str | None = None, lower_case: bool | None = None) -> None:
  """An exported checkpoint in local `ckpt_dir`, which must be new or empty; written
  atomically (built under a temporary name, then renamed)."""
  # Host arrays written by this process alone: no barrier with processes that do not write.
  alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                            active_processes={jax.process_index()})
  with new_directory(ckpt_dir) as tmp:
    with ocp.StandardCheckpointer(multiprocessing_options=alone) as ckptr:
      ckptr.save(tmp / PARAMS, _as_float32(params))
    write_config_json(config, str(tmp / "config.json"))
    if vocab_path:
      shutil.copyfile(vocab_path, tmp / "vocab.txt")
    if lower_case is not None:
      write_json_atomic(tmp / "tokenizer_config.json", {"do_lower_case": bool(lower_case)})


def _as_float32(params: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(x, dtype=np.float32), params)
