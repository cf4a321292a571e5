"""The hand-written VJPs (bert_jax.modeling.ops, heads.add_bias) against autodiff of the textbook math."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bert_jax.modeling import ops


def _keys(n):
  return jax.random.split(jax.random.PRNGKey(0), n)


def _assert_close(actual, expected, tol):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=tol, atol=tol)


def _value_and_grads(fn, args, cotangent_key):
  out, vjp = jax.vjp(fn, *args)
  cotangent = jax.random.normal(cotangent_key, out.shape, out.dtype)
  return out, vjp(cotangent)


def test_gelu_matches_exact_gelu_and_its_gradient():
  x = jax.random.normal(_keys(1)[0], (4, 8, 64)) * 3.0
  reference = lambda x: jax.nn.gelu(x, approximate=False)  # noqa: E731
  _assert_close(_value_and_grads(ops.gelu, (x,), _keys(2)[1]),
                _value_and_grads(reference, (x,), _keys(2)[1]), 2e-6)
  assert ops.gelu(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_layer_norm_matches_flax_layer_norm_values_and_gradients():
  k = _keys(4)
  x = jax.random.normal(k[0], (3, 5, 32)) * 2.0 + 0.5
  scale = 1.0 + 0.1 * jax.random.normal(k[1], (32,))
  bias = 0.1 * jax.random.normal(k[2], (32,))
  flax_ln = nn.LayerNorm(epsilon=1e-12)

  def reference(x, scale, bias):
    return flax_ln.apply({"params": {"scale": scale, "bias": bias}}, x)

  def ours(x, scale, bias):
    return ops.layer_norm(x, scale, bias, 1e-12, jnp.float32)

  _assert_close(_value_and_grads(ours, (x, scale, bias), k[3]),
                _value_and_grads(reference, (x, scale, bias), k[3]), 2e-5)
  assert ops.layer_norm(x, scale, bias, 1e-12, jnp.bfloat16).dtype == jnp.bfloat16



def _compiled_for_an_h100(fn, *shapes) -> str:
  """The entry computation of jit(fn) compiled for an H100 on this host (jax's CUDA plugin, the
  plan-gpu extra), for arguments of `shapes` ((shape, dtype) pairs)."""
  from bert_jax.devices import gpu_targets
  try:
    devices = gpu_targets.devices("h100:1")
  except RuntimeError as e:
    pytest.skip(str(e))
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("data",)),
                                          jax.sharding.PartitionSpec())
  args = [jax.ShapeDtypeStruct(shape, dtype, sharding=replicated) for shape, dtype in shapes]
  return jax.jit(fn).lower(*args).compile().as_text().split("\nENTRY", 1)[1]


def test_layer_norm_backward_on_gpus_reads_its_saved_statistics():
  """LayerNorm's backward compiled for a GPU makes no float32 array of the input's shape.
  XLA's GPU compiler recomputed the mean there and wrote x_hat * g out in float32 for the
  scale's gradient, once per LayerNorm of every step."""
  def loss(x, scale, bias):
    y = ops.layer_norm(x, scale, bias, 1e-12, jnp.bfloat16)
    return jnp.sum(jnp.square(y.astype(jnp.float32)))

  entry = _compiled_for_an_h100(jax.grad(loss, argnums=(0, 1, 2)), ((8, 128, 256), jnp.bfloat16),
                                ((256,), jnp.float32), ((256,), jnp.float32))
  backward = [line for line in entry.splitlines()
              if re.search(r"= f32\[8,128,256\]\S* fusion\(", line) and "transpose(jvp" in line]
  assert backward == []


def test_bias_gradient_on_gpus_is_a_reduction_that_fuses_with_its_producer():
  """Compiled for a GPU, a bias gradient is a sum over rows, computed in the fusion that makes
  the gradient (here GELU's backward): no matmul by a ones vector reading it once more (the
  CPU's fast form), and one fusion for the two."""
  def loss(x, bias):
    return jnp.sum(jnp.square(ops.gelu(ops.add_bias(x, bias)).astype(jnp.float32)))

  # FFN-sized: at smaller sizes XLA turns the ones matmul into a reduction itself
  entry = _compiled_for_an_h100(jax.grad(loss, argnums=(0, 1)), ((32, 128, 3072), jnp.bfloat16),
                                ((3072,), jnp.bfloat16))
  kernels = re.findall(r"= \S+ (fusion|custom-call)\(.*?calls=%(\S+?),", entry)
  assert not any("gemm" in called or "dot" in called for _, called in kernels), kernels
  assert len(kernels) <= 2, kernels


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_attention_matches_autodiff_with_padding_and_dropout(rate):
  k = _keys(6)
  b, t, n, h = 2, 7, 3, 16
  q, kk, v = (jax.random.normal(k[i], (b, t, n, h)) for i in range(3))
  mask = jnp.arange(t)[None, None, None, :] < jnp.array([t, 4])[:, None, None, None]
  keep = jax.random.bernoulli(k[3], 1.0 - rate, (b, n, t, t))
  scale = 1.0 / (1.0 - rate)

  def reference(q, kk, v):
    logits = jnp.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(h)
    probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", jnp.where(keep, probs * scale, 0.0), v)

  def ours(q, kk, v):
    return ops.dropout_attention(q, kk, v, mask, keep, scale)

  got, expected = (_value_and_grads(f, (q, kk, v), k[4]) for f in (ours, reference))
  _assert_close(got, expected, 2e-5)
  # Padded keys get no attention and so no gradient.
  assert np.all(np.asarray(got[1][1])[1, 4:] == 0.0)


def test_add_bias_gradient_is_the_sum_over_rows():
  k = _keys(3)
  x = jax.random.normal(k[0], (4, 5, 11))
  bias = jax.random.normal(k[1], (11,))
  _assert_close(_value_and_grads(ops.add_bias, (x, bias), k[2]),
                _value_and_grads(lambda x, b: x + b, (x, bias), k[2]), 1e-5)


def test_cross_entropy_matches_optax_and_flags_top1_hits():
  k = _keys(3)
  logits = jax.random.normal(k[0], (4, 6, 50)) * 3.0
  labels = jax.random.randint(k[1], (4, 6), 0, 50)
  weights = jax.random.uniform(k[2], (4, 6))

  def ours(logits):
    return jnp.sum(ops.cross_entropy(logits, labels)[0] * weights)

  def reference(logits):
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weights)

  _assert_close(jax.value_and_grad(ours)(logits), jax.value_and_grad(reference)(logits), 1e-5)
  hit = ops.cross_entropy(logits, labels)[1]
  np.testing.assert_array_equal(hit, (jnp.argmax(logits, -1) == labels).astype(jnp.float32))


WEIGHT_GRADS = {"cpu": ops._weight_grad_cpu, "plain": ops._weight_grad_plain}


@pytest.mark.parametrize("layout", sorted(WEIGHT_GRADS))
@pytest.mark.parametrize("n_in,kernel_shape", [(1, (16, 3, 4, 8)), (2, (4, 8, 16)), (1, (64, 8))])
def test_linear_matches_tensordot_values_and_gradients(monkeypatch, layout, n_in, kernel_shape):
  """Both weight-gradient layouts (XLA CPU's and the plain one other platforms get)."""
  monkeypatch.setattr(ops, "_weight_grad", WEIGHT_GRADS[layout])
  k = _keys(3)
  x = jax.random.normal(k[0], (3, 5) + kernel_shape[:n_in])
  kernel = jax.random.normal(k[1], kernel_shape)
  _assert_close(_value_and_grads(lambda x, w: ops.linear(x, w, n_in), (x, kernel), k[2]),
                _value_and_grads(lambda x, w: jnp.tensordot(x, w, axes=n_in), (x, kernel), k[2]),
                2e-5)


@pytest.mark.parametrize("layout", sorted(WEIGHT_GRADS))
@pytest.mark.parametrize("rows,width", [(48, 16), (6, 16)])
def test_unembed_matches_einsum_values_and_gradients(monkeypatch, layout, rows, width):
  """CPU's two table-gradient layouts (48 rows: transpose x and the product; 6: transpose g)
  and the plain one."""
  monkeypatch.setattr(ops, "_weight_grad", WEIGHT_GRADS[layout])
  k = _keys(3)
  x = jax.random.normal(k[0], (3, rows // 3, width))
  table = jax.random.normal(k[1], (40, width))
  _assert_close(_value_and_grads(ops.unembed, (x, table), k[2]),
                _value_and_grads(lambda x, t: jnp.einsum("bpe,ve->bpv", x, t), (x, table), k[2]),
                2e-5)
