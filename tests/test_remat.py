"""model.remat auto's choice (training/remat.py) on made-up peaks: the least recompute that
fits, what a compiler's refusal and a recorded floor do, and what the log says."""

from __future__ import annotations

import types

import pytest

from bert_jax.devices import mfu
from bert_jax.training import remat

GiB = 2**30


def _compiler(peaks: dict):
  """compile_step for `choose`: a program whose memory_analysis peak is peaks[level]; None:
  refused as larger than the chip, as XLA TPU does."""
  compiled = []

  def compile_step(level):
    compiled.append(level)
    if peaks[level] is None:
      raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm.")
    return types.SimpleNamespace(memory_analysis=lambda: types.SimpleNamespace(
        argument_size_in_bytes=peaks[level], output_size_in_bytes=0, alias_size_in_bytes=0,
        temp_size_in_bytes=0, generated_code_size_in_bytes=0))

  return compile_step, compiled


@pytest.mark.parametrize("none, dots, chosen, compiled", [
    (7.7 * GiB, 5 * GiB, False, [False]),            # fits as it is: compiled once
    (14.88 * GiB, 9.36 * GiB, "dots", [False, "dots"]),  # BERT-large at 512 on a v5e chip
    (30 * GiB, 15 * GiB, True, [False, "dots"]),     # 15 > 90% of 16: full remat, untried
    (None, None, True, [False, "dots"]),             # both refused by the compiler
])
def test_the_least_recompute_that_fits_90_percent_of_the_chip(none, dots, chosen, compiled):
  compile_step, calls = _compiler({False: none, "dots": dots})
  choice = remat.choose(compile_step, 16 * GiB)
  assert choice.remat is chosen or choice.remat == chosen
  assert calls == compiled and [level for level, _ in choice.tried] == compiled
  assert mfu.HEADROOM == 0.9


def test_what_the_log_says():
  choice = remat.choose(_compiler({False: 14.88 * GiB, "dots": 9.36 * GiB})[0], 16 * GiB)
  assert choice.describe() == ("remat dots: 14.88 GiB without remat, 9.36 GiB with dots, of "
                               "16.00 GiB per chip")
  refused = remat.choose(_compiler({False: None, "dots": None})[0], 16 * GiB)
  assert refused.describe() == ("remat on: too large to compile without remat, too large to "
                                "compile with dots, of 16.00 GiB per chip")
  fits = remat.choose(_compiler({False: 1 * GiB})[0], None)  # no known capacity: anything fits
  assert fits.remat is False and fits.describe() == "remat off: 1.00 GiB without remat"


def test_a_floor_skips_the_levels_below_and_escalation_climbs_to_full():
  compile_step, calls = _compiler({False: 1 * GiB, "dots": 1 * GiB})
  choice = remat.choose(compile_step, 16 * GiB, floor="dots")
  assert choice.remat == "dots" and calls == ["dots"] and choice.ran_out == (False,)
  assert choice.describe() == ("remat dots: ran out of memory without remat, 1.00 GiB with dots,"
                               " of 16.00 GiB per chip")
  up = choice.escalated()
  assert up.remat is True and up.ran_out == (False, "dots") and up.escalated() is None
  assert up.describe().startswith("remat on: ran out of memory without remat, ran out of memory "
                                  "with dots")
  assert remat.choose(compile_step, 16 * GiB, floor=True).remat is True
  assert calls == ["dots"]  # a floor of full remat compiles nothing to choose


def test_other_compiler_errors_are_not_taken_for_a_full_chip():
  def compile_step(level):
    raise RuntimeError("INTERNAL: ptxas exited with non-zero error code")
  with pytest.raises(RuntimeError, match="ptxas"):
    remat.choose(compile_step, 16 * GiB)
