"""Pretraining checkpoints: an orbax CheckpointManager over params, optimizer state, meta, data.

Layout (what `load_pretrained(workdir)` and `bert-jax-convert to-hf workdir` read):

  workdir/checkpoints/<step>/params     orbax StandardSave of the float32 params pytree
  workdir/checkpoints/<step>/opt_state  orbax StandardSave of the optax state
  workdir/checkpoints/<step>/meta       JSON: step, phase, seed, config hash, params fingerprint
  workdir/checkpoints/<step>/data       JSON, one file per process: the data-iterator state

Orbax writes each step into a temporary directory and renames it when complete, so a save cut
short by SIGKILL never looks like a step. A step that is there but damaged (files deleted or
truncated, an item missing) fails to restore or fails the params fingerprint check, and
`restore` passes over it, with a warning, to the step before (and renames it <step>.corrupt-<time>,
out of the way of the resumed run's saves).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from bert_jax.errors import drop_closed_loop_noise, first_line

log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "meta", "data")


# ---------------------------------------------------------------------------------------------
# The data item: each process writes its own iterator state (each host reads its own shard).

class DataStateHandler(ocp.CheckpointHandler):
  """Writes/reads one JSON file per process with that process's data-iterator state."""

  def save(self, directory: epath.Path, args: "DataStateSave") -> None:
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / _process_file()).write_text(json.dumps(_encode_state(args.state)))

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> Any:
    path = epath.Path(directory) / _process_file()
    if not path.exists():
      raise FileNotFoundError(f"{path}: no data-iterator state for this process")
    return _decode_state(json.loads(path.read_text()))

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def _process_file() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _encode_state(state: Any) -> dict:
  # grain's DataLoader iterators give bytes (JSON text), dataset iterators give dicts.
  if isinstance(state, bytes):
    return {"kind": "bytes", "value": state.decode("utf-8")}
  return {"kind": "json", "value": state}


def _decode_state(d: dict) -> Any:
  return d["value"].encode("utf-8") if d["kind"] == "bytes" else d["value"]


# ---------------------------------------------------------------------------------------------
# Params fingerprint: catches a step whose files restore "successfully" but wrongly (e.g. a
# deleted chunk read back as zeros) and doubles as the finiteness check before a save.

@jax.jit
def _leaf_sums(params: Any) -> list[jax.Array]:
  leaves = jax.tree.leaves(params)
  return [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.abs(x.astype(jnp.float32)))])
          for x in leaves]


def params_fingerprint(params: Any) -> list[list[float]]:
  """[sum, sum of |x|] per leaf, in tree order (a host sync)."""
  return [[float(a), float(b)] for a, b in jax.device_get(_leaf_sums(params))]


def fingerprint_is_finite(fingerprint: Sequence[Sequence[float]]) -> bool:
  return all(math.isfinite(v) for pair in fingerprint for v in pair)


def fingerprints_match(saved: Sequence[Sequence[float]], restored: Sequence[Sequence[float]],
                       rtol: float = 1e-4) -> bool:
  if len(saved) != len(restored):
    return False
  for (s, sa), (r, ra) in zip(saved, restored):
    scale = max(abs(sa), abs(ra), 1e-30)
    if abs(sa - ra) > rtol * scale or abs(s - r) > rtol * scale:
      return False
  return True


_QUOTED_FILE = re.compile(r'(?:local )?file "([^"]+)"')
_OBJECT_REPR = re.compile(r"<[^<>]*(?: object at 0x[0-9a-f]+|bound method)[^<>]*>")


def describe_damage(error: BaseException, limit: int = 240) -> str:
  """Why a checkpoint did not restore, in one line that names the damaged file: tensorstore's
  message without its JSON spec, the innermost file it names; object reprs dropped."""
  text = str(error).split(" [tensorstore_spec")[0].strip()
  files = _QUOTED_FILE.findall(text)
  line = f"{files[-1]}: {text.splitlines()[0].rsplit(': ', 1)[-1]}" if files else \
      first_line(error, 10 * limit)
  while _OBJECT_REPR.search(line):  # innermost first: <bound method f of <X object at 0x..>>
    line = _OBJECT_REPR.sub("...", line)
  return line[:limit]


# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Restored:
  step: int
  params: Any
  opt_state: Any
  meta: dict
  data_state: Any  # None when the caller asked for none (e.g. a finished phase's iterator)


class Checkpointer:
  """Async orbax CheckpointManager under workdir/checkpoints, keeping the last N and every Kth.

  `keep_steps` (e.g. phase boundaries) are kept as well. Saves are forced at the steps the
  caller chooses; the manager's own save interval is not used.
  """

  def __init__(self, workdir: str, *, keep_last: int = 3, keep_every: int = 0,
               keep_steps: Sequence[int] = (), async_save: bool = True):
    self.directory = epath.Path(workdir) / "checkpoints"
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

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, *, params: Any, opt_state: Any, meta: dict,
           data_state: Any = None, fingerprint: list | None = None) -> bool:
    """Starts an (async) save of `step`; returns False, saving nothing, if params are not finite.

    `meta` must be JSON-serialisable; the params fingerprint is added to it.
    """
    fingerprint = params_fingerprint(params) if fingerprint is None else fingerprint
    if not fingerprint_is_finite(fingerprint):
      warnings.warn(f"step {step}: parameters are not finite; checkpoint not written "
                    f"(the last good one, step {self.latest_step()}, is kept)", stacklevel=2)
      return False
    if step in self.manager.all_steps():
      return True  # already saved (e.g. the final step after a boundary save at the same step)
    meta = dict(meta, step=int(step), fingerprint=fingerprint)
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta),
        data=DataStateSave(data_state)), force=True)
    return True

  def restore(self, abstract_params: Any, abstract_opt_state: Any,
              want_data: Callable[[dict], bool] = lambda meta: True) -> Restored | None:
    """Restores the newest step that restores cleanly; None when there is none.

    `abstract_*` are pytrees of jax.ShapeDtypeStruct (with shardings) giving structure and
    placement. `want_data(meta)` says whether the data-iterator state of that step is needed.
    """
    damaged = []
    restored = None
    drop_closed_loop_noise()  # a damaged step's failed restore would print tracebacks
    for step in reversed(self.all_steps()):
      try:
        restored = self._restore_step(step, abstract_params, abstract_opt_state, want_data)
        break
      except Exception as e:  # any damage: missing item, truncated file, bad JSON, mismatch
        msg = describe_damage(e)
        warnings.warn(f"checkpoint {self.directory / str(step)} is incomplete or corrupt "
                      f"({msg}); falling back to the one before", stacklevel=2)
        damaged.append(step)
    if damaged:
      self._set_aside(damaged)
    return restored

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

  def _restore_step(self, step: int, abstract_params: Any, abstract_opt_state: Any,
                    want_data: Callable[[dict], bool]) -> Restored:
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = dict(meta["meta"])
    if int(meta.get("step", -1)) != step:
      raise ValueError(f"meta step {meta.get('step')} != directory step {step}")
    state = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state)))
    if "fingerprint" in meta and not fingerprints_match(
        meta["fingerprint"], params_fingerprint(state["params"])):
      raise ValueError("restored parameters do not match the fingerprint saved with them")
    data_state = None
    if want_data(meta):
      data_state = self.manager.restore(
          step, args=ocp.args.Composite(data=DataStateRestore()))["data"]
    return Restored(step, state["params"], state["opt_state"], meta, data_state)

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption sync point (all hosts agree on the step to stop at)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with the arrays' shardings) for a pytree of jax arrays."""
  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(one, tree)


def workdir_has_checkpoint(workdir: str) -> bool:
  d = epath.Path(workdir) / "checkpoints"
  return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


__all__ = ["Checkpointer", "Restored", "abstract_like", "params_fingerprint",
           "fingerprint_is_finite", "workdir_has_checkpoint", "DataStateSave",
           "DataStateRestore"]
