"""The check a run makes before it trains through the compiled Pallas kernel
(bert_jax.modeling.kernel_check): on this CPU the kernel is interpreted, which is right, so the
check passes; a kernel drawing other dropout bits (what a miscompile would look like) fails it
with one line naming the way around, and the lengths checked are the ones the kernel trains."""

from __future__ import annotations

import types

import pytest

from bert_jax.config import BertConfig
from bert_jax.errors import UserError
from bert_jax.modeling import attention, kernel_check


def _config(**kw):
  base = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, max_position_embeddings=512, dtype="bfloat16")
  return BertConfig(**{**base, **kw})


GPU = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")


def flip_the_kernels_bits(monkeypatch):
  """The kernel with its dropout key's first word flipped: other bits than the XLA path's,
  what a miscompiled hash would draw."""
  kernel = attention.flash_attention
  monkeypatch.setattr(attention, "flash_attention",
                      lambda kvq, q, kv, words, **kw: kernel(kvq, q, kv, words ^ 1, **kw))


def test_a_right_kernel_passes_and_a_wrong_one_fails(monkeypatch):
  assert kernel_check.max_error(32, 16, "float32", 0.1) < 1e-5
  assert kernel_check.max_error(32, 16, "bfloat16", 0.1) < kernel_check.TOLERANCE / 2
  flip_the_kernels_bits(monkeypatch)
  assert kernel_check.max_error(32, 16, "bfloat16", 0.1) > 10 * kernel_check.TOLERANCE


def test_the_cases_checked_are_those_the_runs_steps_take():
  cfg = _config()  # heads of 16, bfloat16, attention dropout 0.1
  lengths = [16, 32, 48, 128, 384, 512]
  assert kernel_check.kernel_cases(cfg, "gpu", lengths) == [(16, 0.1), (32, 0.1), (128, 0.1),
                                                            (512, 0.1)]  # evaluation: cuDNN
  assert kernel_check.kernel_cases(cfg, "gpu", [128], packed=True) == [(128, 0.0), (128, 0.1)]
  assert kernel_check.kernel_cases(cfg, "tpu", [64, 128, 512]) == [(128, 0.1), (512, 0.1)]
  assert kernel_check.kernel_cases(cfg, "cpu", [128]) == []  # interpreted: the tests' form
  fast = cfg.replace(attention_probs_dropout_prob=0.0)
  assert kernel_check.kernel_cases(fast, "gpu", [128]) == []  # cuDNN
  assert kernel_check.kernel_cases(fast.replace(dtype="float32"), "gpu", [128]) == [(128, 0.0)]
  assert kernel_check.kernel_cases(cfg.replace(attention="xla"), "gpu", [128]) == []


def test_verify_logs_a_line_or_stops_the_run(monkeypatch):
  cfg = _config(hidden_size=32, num_attention_heads=2)  # heads of 16
  line = kernel_check.verify(cfg, [32, 32], packed=True, device=GPU)
  assert line.startswith("attention kernel checked on this gpu at length 32 (dropout 0.0), "
                         "32 (dropout 0.1): within ")
  assert kernel_check.verify(cfg.replace(attention="xla"), [32], device=GPU) is None
  flip_the_kernels_bits(monkeypatch)
  with pytest.raises(UserError, match=r"NVIDIA H200.* at length 32, dropout 0.1 .*"
                                      r"--attention xla") as e:
    kernel_check.verify(cfg, [32], device=GPU)
  assert "\n" not in str(e.value)
