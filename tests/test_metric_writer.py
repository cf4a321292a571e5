"""metrics.jsonl rows, TensorBoard events, truncation on resume, interval averaging."""

from __future__ import annotations

import io
import json
import math
import struct

import jax.numpy as jnp
import pytest

from bert_jax.pretraining.metric_writer import IntervalMetrics, MetricWriter


def rows(path):
  return [json.loads(line) for line in open(path)]


def test_rows_carry_step_phase_seq_len_split_and_tensorboard(tmp_path):
  out = io.StringIO()
  w = MetricWriter(str(tmp_path), stream=out)
  w.write(10, {"loss": jnp.float32(2.5), "mfu": 0.25, "nan": float("nan")}, phase=0,
          seq_len=128)
  w.write(10, {"loss": 3.0}, split="eval", phase=0, seq_len=128)
  w.close()
  r = rows(tmp_path / "metrics.jsonl")
  assert [(x["step"], x["split"], x["phase"], x["seq_len"]) for x in r] == [
      (10, "train", 0, 128), (10, "eval", 0, 128)]
  assert r[0]["loss"] == 2.5 and r[0]["nan"] is None   # strict JSON: NaN written as null
  assert "step 10" in out.getvalue() and "mfu 25.0%" in out.getvalue()
  scalars = read_scalars(tmp_path / "tensorboard")
  assert {"train/loss", "eval/loss", "train/mfu"} <= set(scalars)
  assert scalars["train/loss"] == [(10, pytest.approx(2.5))]


def test_mlm_perplexity_is_exp_of_the_rows_mlm_loss(tmp_path):
  out = io.StringIO()
  w = MetricWriter(str(tmp_path), stream=out)
  w.write(5, {"loss": 3.0, "mlm_loss": jnp.float32(2.0)}, split="eval", phase=0, seq_len=128)
  w.write(6, {"loss": 1.0}, phase=0, seq_len=128)   # fine-tuning-like row: no mlm_loss
  w.write(7, {"mlm_loss": 1e4}, phase=0, seq_len=128, progress=False)   # overflow: null
  w.close()
  r = rows(tmp_path / "metrics.jsonl")
  assert r[0]["mlm_perplexity"] == pytest.approx(math.exp(2.0), rel=1e-12)
  assert "mlm_perplexity" not in r[1] and r[2]["mlm_perplexity"] is None
  assert f"mlm_ppl {math.exp(2.0):.2f}" in out.getvalue().splitlines()[0]
  assert read_scalars(tmp_path / "tensorboard")["eval/mlm_perplexity"] == [
      (5, pytest.approx(math.exp(2.0), rel=1e-6))]


def read_scalars(logdir):
  """{tag: [(step, value)]} from the TFRecord-framed event files (no TensorFlow needed)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in sorted(logdir.iterdir()):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_disabled_writer_writes_nothing(tmp_path):
  out = io.StringIO()
  w = MetricWriter(str(tmp_path / "w"), enabled=False, stream=out)
  row = w.write(1, {"loss": 1.0}, phase=0, seq_len=8)
  w.message("hello")
  w.close()
  assert row["loss"] == 1.0 and not (tmp_path / "w").exists() and out.getvalue() == ""


def test_resume_truncates_rows_after_the_checkpoint(tmp_path):
  w = MetricWriter(str(tmp_path), tensorboard=False, stream=io.StringIO())
  for step in (5, 10, 15, 20):
    w.write(step, {"loss": float(step)}, phase=0, seq_len=8)
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 25, "spl')   # a line torn by SIGKILL
  w = MetricWriter(str(tmp_path), tensorboard=False, resume_step=10, stream=io.StringIO())
  w.write(15, {"loss": 1.0}, phase=0, seq_len=8)
  w.close()
  assert [(x["step"], x["loss"]) for x in rows(tmp_path / "metrics.jsonl")] == [
      (5, 5.0), (10, 10.0), (15, 1.0)]


def test_interval_metrics_average_finite_steps_only():
  m = IntervalMetrics()
  def step(loss, finite, lr):
    return {"loss": jnp.float32(loss), "mlm_loss": jnp.float32(loss), "mlm_accuracy": 0.5,
            "nsp_loss": 0.1, "nsp_accuracy": 1.0, "grad_norm": 2.0,
            "learning_rate": jnp.float32(lr), "finite": jnp.float32(finite)}
  m.add(1, step(4.0, 1, 0.1))
  m.add(2, step(float("nan"), 0, 0.2))
  m.add(3, step(2.0, 1, 0.3))
  assert m.first_nonfinite_step() == 2
  s = m.summary(sequences_per_step=8, tokens_per_step=8 * 16, flops_per_step=1e6,
                peak_flops=1e9)
  assert s["loss"] == pytest.approx(3.0) and s["skipped_steps"] == 1
  assert s["learning_rate"] == pytest.approx(0.3)
  assert s["tokens_per_sec"] == pytest.approx(16 * s["sequences_per_sec"])
  assert s["mfu"] == pytest.approx(s["steps_per_sec"] * 1e6 / 1e9)
  assert len(m) == 0 and m.first_nonfinite_step() is None


def test_interval_all_skipped_gives_nan_loss():
  m = IntervalMetrics()
  m.add(1, {"loss": jnp.float32(float("inf")), "finite": jnp.float32(0)})
  s = m.summary(sequences_per_step=1, tokens_per_step=1)
  assert math.isnan(s["loss"]) and s["skipped_steps"] == 1


def test_first_summary_after_a_resume_says_it_averages_only_the_steps_since():
  m = IntervalMetrics(resumed_at=250)
  for step in (251, 252, 253):
    m.add(step, {"loss": jnp.float32(1.0), "finite": jnp.float32(1)})
  first = m.summary(sequences_per_step=1, tokens_per_step=1)
  assert (first["averaged_steps"], first["resumed_at_step"]) == (3, 250)
  assert "mean of the 3 steps since the resume at 250" in MetricWriter.progress_line(
      {"split": "train", "step": 253, "phase": 0, "seq_len": 8, **first})
  m.add(254, {"loss": jnp.float32(1.0), "finite": jnp.float32(1)})
  second = m.summary(sequences_per_step=1, tokens_per_step=1)
  assert second["averaged_steps"] == 1 and "resumed_at_step" not in second
