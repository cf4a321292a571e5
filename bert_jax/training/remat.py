"""model.remat auto: per phase, the least recomputation whose train step fits a chip.

The levels, least recompute first (config.REMATS): False keeps every activation; "dots" keeps
each layer's weight-matmul outputs and recomputes the rest (LayerNorms, GELU, dropout, attention;
about 5% more FLOPs for BERT-large at 512); True recomputes each layer whole (about a third more).
Each level's step is compiled in turn and the first whose peak (XLA's memory_analysis) is within
HEADROOM of the chip's memory is kept; a compiler that refuses a program as larger than the chip
(XLA TPU) counts as not fitting, and full remat is what is left. A level that still runs out of
memory when it runs is recorded (the workdir's remat.json) as the floor for later starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from bert_jax.config import REMATS
from bert_jax.devices import mfu

NAMES = {False: "off", "dots": "dots", True: "on"}
LEVELS = {name: level for level, name in NAMES.items()}  # fine-tuning's --remat off|dots|on
_LABELS = {False: "without remat", "dots": "with dots", True: "with full remat"}


@dataclasses.dataclass(frozen=True)
class RematChoice:
  """remat: the level the phase's step runs at. tried: (level, peak bytes per chip, None where
  the compiler refused it) of each step compiled to choose. ran_out: levels whose step ran out
  of device memory when it ran (in this start or an earlier one)."""
  remat: bool | str
  tried: tuple[tuple[bool | str, float | None], ...] = ()
  capacity: float | None = None
  ran_out: tuple[bool | str, ...] = ()

  def describe(self) -> str:
    """e.g. `remat dots: 14.88 GiB without remat, 9.36 GiB with dots, of 16.00 GiB per chip`."""
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    peaks = dict(self.tried)
    parts = []
    for level in REMATS:
      if level in self.ran_out:
        parts.append(f"ran out of memory {_LABELS[level]}")
      elif level in peaks:
        needs = "too large to compile" if peaks[level] is None else gib(peaks[level])
        parts.append(f"{needs} {_LABELS[level]}")
    if parts and self.tried and self.capacity:
      parts.append(f"of {gib(self.capacity)} per chip")
    return f"remat {NAMES[self.remat]}" + (f": {', '.join(parts)}" if parts else "")

  def escalated(self) -> RematChoice | None:
    """After this level's step ran out of memory when it ran: the next level up, None at the
    top."""
    if self.remat is True:
      return None
    return dataclasses.replace(self, remat=REMATS[REMATS.index(self.remat) + 1],
                               ran_out=self.ran_out + (self.remat,))


def choose(compile_step: Callable[[bool | str], Any], capacity: float | None,
           floor: bool | str = False) -> RematChoice:
  """The least level from `floor` up whose compiled step (`compile_step(level)`) fits HEADROOM
  of `capacity` bytes (None: any fits); full remat when none below it does."""
  start = REMATS.index(floor)
  tried = []
  for level in REMATS[start:-1]:
    try:
      peak = mfu.compiled_peak_bytes(compile_step(level))
    except Exception as e:  # XLA TPU refuses a program larger than the chip
      if not mfu.out_of_memory(e):
        raise
      peak = None
    tried.append((level, peak))
    if peak is not None and (capacity is None or peak <= mfu.HEADROOM * capacity):
      return RematChoice(level, tuple(tried), capacity, REMATS[:start])
  return RematChoice(True, tuple(tried), capacity, REMATS[:start])
