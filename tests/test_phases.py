"""Phase tiling from fractions of total_steps, and the pure phase_at lookup."""

from __future__ import annotations

import ml_collections
import pytest

from bert_jax.errors import UserError
from bert_jax.training.phases import make_phases, phase_at


def paper_cfg(total_steps=1_000_000, **optim):
  return ml_collections.ConfigDict(dict(
      total_steps=total_steps,
      phases=[dict(fraction=0.9, seq_len=128, max_predictions=20, batch_size=256, grad_accum=1,
                   data="", warmup_steps=-1, learning_rate=-1.0),
              dict(fraction=0.1, seq_len=512, max_predictions=80, batch_size=256, grad_accum=4,
                   data="/d2", warmup_steps=500, learning_rate=5e-5)],
      optim=dict(warmup_steps=10_000, learning_rate=1e-4, **optim)))


def test_paper_schedule_tiles_one_million_steps():
  p1, p2 = make_phases(paper_cfg())
  assert (p1.start_step, p1.end_step, p1.seq_len, p1.max_predictions) == (0, 900_000, 128, 20)
  assert (p2.start_step, p2.end_step, p2.seq_len, p2.max_predictions) == (900_000, 1_000_000,
                                                                        512, 80)
  # -1 inherits cfg.optim; explicit values stay.
  assert (p1.warmup_steps, p1.learning_rate) == (10_000, 1e-4)
  assert (p2.warmup_steps, p2.learning_rate, p2.data) == (500, 5e-5, "/d2")
  assert p2.micro_batch_size == 64 and p2.index == 1
  assert phase_at([p1, p2], 0) is p1
  assert phase_at([p1, p2], 899_999) is p1
  assert phase_at([p1, p2], 900_000) is p2
  assert phase_at([p1, p2], 999_999) is p2
  assert phase_at([p1, p2], 1_000_000) is p2  # past the end: the last phase


@pytest.mark.parametrize("total", [1, 2, 3, 10, 11, 200, 999])
def test_phases_tile_exactly_and_are_never_empty(total):
  phases = make_phases(paper_cfg(total))
  assert phases[0].start_step == 0 and phases[-1].end_step == total
  for a, b in zip(phases, phases[1:]):
    assert a.end_step == b.start_step
  if total >= len(phases):
    assert all(p.num_steps >= 1 for p in phases)
  for step in range(total):
    p = phase_at(phases, step)
    assert p.start_step <= step < p.end_step


def test_ten_steps_is_nine_then_one():
  p1, p2 = make_phases(paper_cfg(10))
  assert (p1.start_step, p1.end_step, p2.start_step, p2.end_step) == (0, 9, 9, 10)
  assert [phase_at([p1, p2], s).seq_len for s in range(10)] == [128] * 9 + [512]


def test_three_phases_rounding():
  cfg = paper_cfg(7)
  cfg.phases = [dict(fraction=f, seq_len=8, max_predictions=2, batch_size=4)
                for f in (0.5, 0.3, 0.2)]
  phases = make_phases(cfg)
  assert [(p.start_step, p.end_step) for p in phases] == [(0, 4), (4, 6), (6, 7)]
  assert phases[0].grad_accum == 1 and phases[0].warmup_steps == 10_000


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c, "total_steps", 0), "total_steps"),
    (lambda c: c.phases[0].update(fraction=0.5), "fractions"),
    (lambda c: c.phases[1].update(grad_accum=3), r"phases\[1\].grad_accum"),
    (lambda c: c.phases[0].update(max_predictions=200), r"phases\[0\].max_predictions"),
    (lambda c: c.phases[0].update(seq_len=0), r"phases\[0\].seq_len"),
])
def test_bad_phases_name_the_field(change, message):
  cfg = paper_cfg()
  change(cfg)
  with pytest.raises(UserError, match=message):
    make_phases(cfg)


def test_phase_at_rejects_negative_steps():
  with pytest.raises(ValueError):
    phase_at(make_phases(paper_cfg(10)), -1)
