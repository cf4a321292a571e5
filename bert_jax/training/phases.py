"""The pretraining schedule as data: phases that take fractions of one global step counter.

The paper runs 90% of its steps at sequence length 128 and 10% at 512; `total_steps=N` shrinks
any schedule and keeps its proportions. `phase_at(phases, step)` is pure, so a resumed run lands
in the right phase from its step alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from bert_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Phase:
  """One phase: steps [start_step, end_step) of the global counter, at one sequence length.

  warmup_steps and learning_rate are resolved (a phase's -1 inherits cfg.optim's value); they
  drive the schedule only when cfg.optim.schedule == "per_phase".
  """
  index: int
  start_step: int
  end_step: int
  seq_len: int
  max_predictions: int
  batch_size: int
  grad_accum: int = 1
  data: str = ""
  warmup_steps: int = 0
  learning_rate: float = 1e-4

  @property
  def num_steps(self) -> int:
    return self.end_step - self.start_step

  @property
  def micro_batch_size(self) -> int:
    return self.batch_size // self.grad_accum


def _get(d: Any, key: str, default: Any) -> Any:
  value = d.get(key, default) if isinstance(d, Mapping) or hasattr(d, "get") else default
  return default if value is None else value


def _boundaries(fractions: Sequence[float], total_steps: int) -> list[int]:
  """Cumulative rounded boundaries [0, b1, ..., total]; each phase gets >= 1 step when there are
  at least as many steps as phases."""
  n = len(fractions)
  bounds, acc = [0], 0.0
  for f in fractions[:-1]:
    acc += f
    bounds.append(int(round(acc * total_steps)))
  bounds.append(total_steps)
  if total_steps >= n:
    for i in range(1, n):  # push forward so no phase is empty, but leave room for the rest
      bounds[i] = min(max(bounds[i], bounds[i - 1] + 1), total_steps - (n - i))
  return bounds


def make_phases(cfg: Any) -> list[Phase]:
  """Phases from cfg.total_steps and cfg.phases (fractions summing to 1) that exactly tile
  [0, total_steps). Per-phase warmup_steps / learning_rate of -1 inherit cfg.optim's."""
  total_steps = int(cfg.total_steps)
  if total_steps < 1:
    raise UserError(f"config.total_steps={total_steps}: expected a positive integer")
  specs = list(cfg.phases)
  if not specs:
    raise UserError("config.phases is empty: expected at least one phase")
  fractions = [float(_get(p, "fraction", 0.0)) for p in specs]
  if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
    raise UserError(f"config.phases fractions {fractions}: expected positive numbers summing "
                    "to 1")
  optim = cfg.get("optim", {}) if hasattr(cfg, "get") else {}
  default_warmup = int(_get(optim, "warmup_steps", 0))
  default_lr = float(_get(optim, "learning_rate", 1e-4))
  bounds = _boundaries(fractions, total_steps)
  phases = []
  for i, spec in enumerate(specs):
    where = f"config.phases[{i}]"
    ints = {}
    for key in ("seq_len", "max_predictions", "batch_size"):
      if _get(spec, key, None) is None:
        raise UserError(f"{where}.{key} is missing")
      ints[key] = int(_get(spec, key, 0))
      if ints[key] < 1:
        raise UserError(f"{where}.{key}={ints[key]}: expected a positive integer")
    grad_accum = int(_get(spec, "grad_accum", 1))
    if grad_accum < 1 or ints["batch_size"] % grad_accum:
      raise UserError(f"{where}.grad_accum={grad_accum}: expected a positive divisor of "
                      f"batch_size={ints['batch_size']}")
    if ints["max_predictions"] > ints["seq_len"]:
      raise UserError(f"{where}.max_predictions={ints['max_predictions']}: expected at most "
                      f"seq_len={ints['seq_len']}")
    warmup = int(_get(spec, "warmup_steps", -1))
    lr = float(_get(spec, "learning_rate", -1.0))
    phases.append(Phase(
        index=i, start_step=bounds[i], end_step=bounds[i + 1], grad_accum=grad_accum,
        data=str(_get(spec, "data", "")),
        warmup_steps=default_warmup if warmup < 0 else warmup,
        learning_rate=default_lr if lr < 0 else lr, **ints))
  return phases


def phase_at(phases: Sequence[Phase], step: int) -> Phase:
  """The phase that runs global step `step`; steps at or past the end belong to the last."""
  if step < 0:
    raise ValueError(f"step {step} is negative")
  for phase in phases:
    if phase.start_step <= step < phase.end_step:
      return phase
  return phases[-1]
