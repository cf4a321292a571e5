"""Hand-written backward passes for BERT's layers: linear maps, GELU, LayerNorm, the
softmax-dropout core of attention, and the MLM vocabulary bias and cross-entropy.

Linear maps (and the tied MLM decoder, `unembed`) run forward and backward as plain 2-D
matmuls: autodiff of a [B,T,E] dot_general contracts two axes for the weight gradient, for
which XLA CPU picks transposed operand layouts and a slower matmul path (a BERT-mini FFN
block alone: 185 -> 104 ms forward + backward).

Autodiff of the textbook formulas keeps every intermediate for the backward pass (GELU: four
[B,T,F] tensors; flax's LayerNorm: four [B,T,E]; softmax + dropout: five [B,N,T,S]). These VJPs
keep one input (plus per-row statistics or a boolean mask) and recompute the rest inside the
backward fusion, which is less memory and fewer passes over it. The math is the textbook one;
tests compare values and gradients against plain autodiff.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_SQRT_HALF = np.float32(np.sqrt(0.5))
_INV_SQRT_2PI = np.float32(1.0 / np.sqrt(2.0 * np.pi))


# ----------------------------------------------------------------------------- matmuls

def _mm(a, b):
  """a @ b accumulated in float32, returned in the operands' dtype. XLA CPU runs a bfloat16
  dot on its fast kernels (AMX / AVX-512 BF16: about 6x float32 here) only when it returns
  float32, and TPUs accumulate in float32 anyway; for float32 operands this is a plain a @ b."""
  return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(jnp.result_type(a, b))


def _einsum(spec, a, b):
  """jnp.einsum with float32 accumulation, returned in the operands' dtype (as `_mm`)."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(
      jnp.result_type(a, b))


# ----------------------------------------------------------------------------- linear

def _as_matrices(x, kernel, n_in):
  k = math.prod(kernel.shape[:n_in])
  return x.reshape(-1, k), kernel.reshape(k, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear(x, kernel, n_in: int):
  """x [..., K1..Kn] contracted with the first n_in axes of kernel [K1..Kn, O...]."""
  return _linear_fwd(x, kernel, n_in)[0]


def _linear_fwd(x, kernel, n_in):
  x_MK, kernel_KO = _as_matrices(x, kernel, n_in)
  y_MO = _mm(x_MK, kernel_KO)
  return y_MO.reshape(x.shape[:x.ndim - n_in] + kernel.shape[n_in:]), (x, kernel)


def _linear_bwd(n_in, residuals, g):
  x, kernel = residuals
  x_MK, kernel_KO = _as_matrices(x, kernel, n_in)
  g_MO = g.reshape(x_MK.shape[0], kernel_KO.shape[1])
  g_x = jax.lax.platform_dependent(g_MO, kernel_KO, cpu=_input_grad_cpu,
                                   default=lambda g, k: _mm(g, k.T))
  return g_x.reshape(x.shape), _weight_grad(x_MK, g_MO).reshape(kernel.shape)


def _weight_grad(x_MK, g_MO):
  """x.T @ g, the [K, O] gradient of a [K, O] kernel, laid out for the platform the program is
  lowered for (`platform_dependent` keeps only that platform's branch), never the host's."""
  return jax.lax.platform_dependent(x_MK, g_MO, cpu=_weight_grad_cpu, default=_weight_grad_plain)


def _weight_grad_plain(x_MK, g_MO):
  return _mm(x_MK.T, g_MO)  # TPU/GPU compilers lay out this dot well themselves


def _row_major_t(x):
  """x.T copied in memory, row-major. XLA CPU's fast dot kernels (and all of its bfloat16 ones)
  take row-major [M, K] @ [K, N] only: it upcasts any other bfloat16 dot to a float32 one
  (~6x slower), and a transpose kept behind a barrier may still stay a layout change.
  Flattening behind the barrier forces the copy."""
  return jax.lax.optimization_barrier(x.T.reshape(-1)).reshape(x.shape[::-1])


def _input_grad_cpu(g_MO, kernel_KO):
  return _mm(g_MO, _row_major_t(kernel_KO))  # the kernel is the small operand


def _weight_grad_cpu(x_MK, g_MO):
  # Either transpose x, or transpose g and then the [O, K] product back, whichever moves fewer
  # elements. The product's own transpose may stay a layout change (its consumers are
  # elementwise), so only a barrier keeps XLA from folding it into the dot.
  (m, k), o = x_MK.shape, g_MO.shape[1]
  if m * k < m * o + o * k:
    return _mm(_row_major_t(x_MK), g_MO)
  return jax.lax.optimization_barrier(_mm(_row_major_t(g_MO), x_MK)).T


linear.defvjp(_linear_fwd, _linear_bwd)


@jax.custom_vjp
def unembed(x, table):
  """x [..., E] times table [V, E] transposed: logits against a (tied) embedding table."""
  return _unembed_fwd(x, table)[0]


def _unembed_fwd(x, table):
  logits = _mm(x.reshape(-1, x.shape[-1]), table.T)
  return logits.reshape(x.shape[:-1] + table.shape[:1]), (x, table)


def _unembed_bwd(residuals, g):
  x, table = residuals
  x_MK = x.reshape(-1, x.shape[-1])
  g_MV = g.reshape(x_MK.shape[0], table.shape[0])
  g_x = _mm(g_MV, table).reshape(x.shape)
  # The table's gradient g.T @ x is a kernel gradient with g in x's place: on CPU, BERT-mini's
  # 640 positions transpose x and the [E, V] product (5 ms instead of 15 ms for g), BERT-base's
  # 160 transpose g.
  return g_x, _weight_grad(g_MV, x_MK)


unembed.defvjp(_unembed_fwd, _unembed_bwd)


# ----------------------------------------------------------------------------- GELU

@jax.custom_vjp
def gelu(x):
  """Exact GELU x·Φ(x) in the erf form (as PyTorch and BERT), computed in float32."""
  xf = x.astype(jnp.float32)
  return (xf * (0.5 + 0.5 * jax.lax.erf(xf * _SQRT_HALF))).astype(x.dtype)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  xf = x.astype(jnp.float32)
  cdf = 0.5 + 0.5 * jax.lax.erf(xf * _SQRT_HALF)
  pdf = jnp.exp(-0.5 * xf * xf) * _INV_SQRT_2PI
  return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


# ----------------------------------------------------------------------------- LayerNorm

def _row_stats(xf, epsilon):
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)  # two-pass, like PyTorch
  return mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, epsilon: float, dtype):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis; statistics in float32,
  output in `dtype`."""
  return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
  xf = x.astype(jnp.float32)
  mean, rstd = _row_stats(xf, epsilon)
  y = (xf - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  # The backward pass reads the statistics it is handed. Without the barrier XLA's GPU compiler
  # recomputes the mean there, in a row-normalising fusion that then writes x_hat * g as a
  # float32 [B,T,H] array for the scale's gradient: 100 MB written and read per LayerNorm of
  # BERT-base at 128 x 256, 0.85 of a 31.7 ms step's bound on an H200 (tools/gpu_roofline.py).
  saved = jax.lax.platform_dependent(
      mean, rstd, cuda=lambda m, r: jax.lax.optimization_barrier((m, r)),
      default=lambda m, r: (m, r))
  return y.astype(dtype), (x, *saved, scale)


def _layer_norm_bwd(epsilon, dtype, residuals, g):
  del epsilon, dtype
  x, mean, rstd, scale = residuals
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  gf = g.astype(jnp.float32)
  g_hat = gf * scale.astype(jnp.float32)
  g_x = rstd * (g_hat - jnp.mean(g_hat, -1, keepdims=True)
                - x_hat * jnp.mean(g_hat * x_hat, -1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  g_scale = jnp.sum(gf * x_hat, axis=rows)
  g_bias = jnp.sum(gf, axis=rows)
  return g_x.astype(x.dtype), g_scale.astype(scale.dtype), g_bias.astype(scale.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# ----------------------------------------------------------------------------- attention

def _softmax_probs(q_BTNH, k_BSNH, mask_B11S):
  head_dim = q_BTNH.shape[-1]
  logits_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH,
                           preferred_element_type=jnp.float32) / np.sqrt(head_dim)
  logits_BNTS = jnp.where(mask_B11S, logits_BNTS, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits_BNTS, axis=-1)


def attention(q_BTNH, k_BSNH, v_BSNH, mask_B11S):
  """softmax(q·k/sqrt(H), masked)·v without dropout (evaluation): jax.nn's
  dot_product_attention, or for bfloat16 the same with float32 accumulation (see `_mm`; on
  XLA CPU 1.35 s -> 1.11 s for a MiniLM forward at 128 x 128, while in float32 jax.nn's runs
  2.2 s against this one's 3.4 s)."""
  if v_BSNH.dtype == jnp.float32:
    return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=mask_B11S)
  probs_BNTS = _softmax_probs(q_BTNH, k_BSNH, mask_B11S).astype(v_BSNH.dtype)
  return _einsum("bnts,bsnh->btnh", probs_BNTS, v_BSNH)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def dropout_attention(q_BTNH, k_BSNH, v_BSNH, mask_B11S, keep_BNTS, keep_scale: float):
  """softmax(q·k/sqrt(H), masked) with dropout (`keep_BNTS`, kept values times `keep_scale`),
  then ·v. The softmax is in float32; the product with v in v's dtype."""
  return _dropout_attention_fwd(q_BTNH, k_BSNH, v_BSNH, mask_B11S, keep_BNTS, keep_scale)[0]


def _dropout_attention_fwd(q_BTNH, k_BSNH, v_BSNH, mask_B11S, keep_BNTS, keep_scale):
  probs_BNTS = _softmax_probs(q_BTNH, k_BSNH, mask_B11S)
  dropped_BNTS = jnp.where(keep_BNTS, probs_BNTS * keep_scale, 0.0).astype(v_BSNH.dtype)
  out_BTNH = _einsum("bnts,bsnh->btnh", dropped_BNTS, v_BSNH)
  return out_BTNH, (q_BTNH, k_BSNH, v_BSNH, mask_B11S, probs_BNTS.astype(v_BSNH.dtype),
                    keep_BNTS)


def _dropout_attention_bwd(keep_scale, residuals, g_BTNH):
  q_BTNH, k_BSNH, v_BSNH, mask_B11S, probs_BNTS, keep_BNTS = residuals
  dtype = v_BSNH.dtype
  dropped_BNTS = jnp.where(keep_BNTS, probs_BNTS * keep_scale, 0.0).astype(dtype)
  g_v = _einsum("bnts,btnh->bsnh", dropped_BNTS, g_BTNH.astype(dtype))
  g_dropped_BNTS = jnp.einsum("btnh,bsnh->bnts", g_BTNH.astype(dtype), v_BSNH,
                              preferred_element_type=jnp.float32)
  g_probs_BNTS = jnp.where(keep_BNTS, g_dropped_BNTS * keep_scale, 0.0)
  probs_f32 = probs_BNTS.astype(jnp.float32)
  g_logits_BNTS = probs_f32 * (g_probs_BNTS
                               - jnp.sum(g_probs_BNTS * probs_f32, -1, keepdims=True))
  # Masked logits are constants: no gradient, also where a query sees no key at all (its
  # probabilities are uniform, not zero).
  g_logits_BNTS = jnp.where(mask_B11S, g_logits_BNTS / np.sqrt(q_BTNH.shape[-1]), 0.0)
  g_logits_BNTS = g_logits_BNTS.astype(dtype)
  g_q = _einsum("bnts,bsnh->btnh", g_logits_BNTS, k_BSNH)
  g_k = _einsum("bnts,btnh->bsnh", g_logits_BNTS, q_BTNH)
  return (g_q.astype(q_BTNH.dtype), g_k.astype(k_BSNH.dtype), g_v.astype(dtype), None, None)


dropout_attention.defvjp(_dropout_attention_fwd, _dropout_attention_bwd)


# ----------------------------------------------------------------------------- MLM output

def add_bias(x, bias):
  """x + bias over x's trailing bias.ndim axes. The bias gradient is a ones-vector matmul where
  the program is not for a GPU: XLA CPU sums the rows of a gradient (a [positions, vocab] one,
  or a layer's [B, T, F]) many times slower than it multiplies them by ones (25x for the
  vocabulary). On GPUs it is a float32 sum over the rows, which XLA computes in the fusion that
  makes the gradient (GELU's backward, a dropout's) where the matmul read it once more: 0.5 of
  BERT-base's 30.8 ms step bound on an H200 at 128 x 256 (tools/gpu_roofline.py)."""
  rows = x.shape[:x.ndim - bias.ndim]
  return _add_bias(x.reshape(rows + (-1,)), bias.reshape(-1)).reshape(x.shape)


@jax.custom_vjp
def _add_bias(x, bias):
  return x + bias


def _add_bias_fwd(x, bias):
  return x + bias, None


def _add_bias_bwd(_, g):
  g_bias = jax.lax.platform_dependent(g, cuda=_sum_of_rows, default=_ones_times_rows)
  return g, g_bias.astype(g.dtype)


def _ones_times_rows(g):
  ones = jnp.ones(g.shape[:-1], g.dtype)
  return jnp.tensordot(ones, g, axes=g.ndim - 1, preferred_element_type=jnp.float32)


def _sum_of_rows(g):
  return jnp.sum(g.astype(jnp.float32), axis=tuple(range(g.ndim - 1)))


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def cross_entropy(logits, labels):
  """(-log softmax(logits)[label], whether the label's logit is the largest) per row, both
  float32. The gradient (softmax - one_hot) is one pass over the [rows, vocab] logits. The hit
  is a max-compare, not an argmax (a slow two-output reduce on CPU): an exact tie, which argmax
  would break by index, counts as a hit."""
  return _cross_entropy_fwd(logits, labels)[0]


def _cross_entropy_fwd(logits, labels):
  logits = logits.astype(jnp.float32)
  top = jnp.max(logits, axis=-1)
  lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  hit = (label_logit >= top).astype(jnp.float32)
  return (lse - label_logit, hit), (logits, labels, lse)


def _cross_entropy_bwd(residuals, g):
  logits, labels, lse = residuals
  g_nll, _ = g  # `hit` has no gradient
  one_hot = jnp.arange(logits.shape[-1]) == labels[..., None]
  g_logits = (jnp.exp(logits - lse[..., None]) - one_hot) * g_nll[..., None]
  return g_logits, None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)
