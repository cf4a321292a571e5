"""Model FLOPs per sequence (hand count and the model's own matmuls) and device peaks."""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax.config import BertConfig
from bert_jax.devices import mfu
from bert_jax.modeling.heads import BertForPreTraining

TINY = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64)


def test_hand_count_for_a_tiny_config():
  # E=64, F=128, V=128, L=2, T=16, P=4, multiply-adds of one forward pass:
  encoder = 16 * 2 * (4 * 64 * 64 + 2 * 64 * 128)   # 1,048,576: QKV+O and FFN per token
  attention = 2 * 2 * 16 * 16 * 64                   # 65,536: QK^T and PV, full T x T
  mlm = 4 * (64 * 64 + 64 * 128)                     # 49,152: transform + decoder at P=4
  pooler_nsp = 64 * 64 + 64 * 2                      # 4,224
  assert encoder + attention + mlm + pooler_nsp == 1_167_488
  assert mfu.forward_macs_per_sequence(TINY, 16, 4) == 1_167_488
  assert mfu.train_flops_per_sequence(TINY, 16, 4) == 6 * 1_167_488  # 2 FLOPs x (fwd + 2 bwd)


def _dot_macs(jaxpr) -> int:
  """Multiply-adds of every dot_general in a jaxpr, sub-jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      out = eqn.outvars[0].aval.shape
      total += int(np.prod(out)) * int(np.prod([lhs[d] for d in lhs_contract]))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _dot_macs(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _dot_macs(sub)
  return total


@pytest.mark.parametrize("seq_len, preds", [(16, 4), (32, 8)])
def test_formula_equals_the_models_matmuls(seq_len, preds):
  model = BertForPreTraining(TINY)
  batch = 2
  ids = jnp.zeros((batch, seq_len), jnp.int32)
  positions = jnp.zeros((batch, preds), jnp.int32)
  params = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, ids,
                                                      positions)))
  jaxpr = jax.make_jaxpr(lambda p: model.apply(p, ids, ids, ids, positions))(params)
  assert _dot_macs(jaxpr.jaxpr) == batch * mfu.forward_macs_per_sequence(TINY, seq_len, preds)


def test_peak_table_and_cpu_measurement():
  fake = lambda kind, platform="gpu": types.SimpleNamespace(device_kind=kind, platform=platform)
  assert mfu.peak_flops_per_device(fake("NVIDIA H100 80GB HBM3")) == 989e12
  assert mfu.peak_flops_per_device(fake("NVIDIA H100 PCIe")) == 756e12
  assert mfu.peak_flops_per_device(fake("NVIDIA A100-SXM4-40GB")) == 312e12
  assert mfu.peak_flops_per_device(fake("NVIDIA H200", "gpu")) == 989e12
  assert mfu.peak_flops_per_device(fake("TPU v4", "tpu")) == 275e12
  assert mfu.peak_flops_per_device(fake("TPU v5 lite", "tpu")) == 197e12
  assert mfu.peak_flops_per_device(fake("TPU v5p", "tpu")) == 459e12
  assert mfu.peak_flops_per_device(fake("TPU v6 lite", "tpu")) == 918e12
  assert mfu.peak_flops_per_device(fake("Some Future GPU")) is None
  cpu = jax.devices("cpu")[0]
  peak = mfu.peak_flops_per_device(cpu)
  assert peak > 1e8  # any real CPU does > 0.1 GFLOP/s on a 512^3 matmul
  assert mfu.peak_flops_per_device(cpu) == peak  # cached
  assert mfu.mfu(1e9, 10.0, 2, 1e10) == pytest.approx(0.5)
  assert mfu.mfu(1e9, 10.0, 2, None) is None
