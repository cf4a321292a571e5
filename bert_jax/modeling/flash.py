"""A flash-attention Pallas kernel with BERT's attention dropout inside it: forward, dK/dV and
dQ kernels over blocks of queries and keys, no [B,N,T,S] tensor in memory.

Dropout draws the very bits `dropout.keep_mask` draws for the [B,N,T,S] probabilities: the
same Threefry counters, hashed per element inside the kernel from the element's global
(b, n, t, s). Two layouts of the per-query statistics and segment ids: TPU vector tiles (128
lanes, 8 sublanes, key blocks of 128) and plain columns and rows (Triton on GPUs). Where it is
used, and how it is sharded, is `bert_jax.modeling.attention`'s business.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from bert_jax.modeling import dropout

_NEG = float(np.finfo(np.float32).min)


class Config(NamedTuple):
  rate: float
  interpret: bool
  block_q: int
  block_k: int
  lanes: int  # width of a query's statistics and segment id: 128 (a TPU lane tile) or 1
  sublanes: int  # height of the key segment ids: 8 (a TPU sublane tile) or 1
  smem: bool  # the dropout words in scalar memory (TPU)
  triton: bool  # compiled by Triton (GPU)

  @property
  def threshold(self) -> int:
    return dropout.keep_threshold(self.rate)

  @property
  def keep_scale(self) -> float:
    return 65536.0 / self.threshold


class _Where(NamedTuple):
  """The global row and head of a kernel instance (read once, at the kernel's top level)."""
  b: jax.Array
  n: jax.Array


def _where(words_ref) -> _Where:
  return _Where(pl.program_id(0).astype(jnp.uint32) + words_ref[2],
                pl.program_id(1).astype(jnp.uint32) + words_ref[3])


def _keep(words_ref, at: _Where, cfg: Config, seq_q: int, seq_k: int, t0, s0, shape):
  """The kept elements of a [bq, bk] block at (t0, s0): the bits keep_mask draws for
  [B, N, T, S] (counter (n*T + t)*C + s mod C under row b, 16-bit quarter s // C; C = S/4, a
  power of two, so both are a shift and a mask)."""
  b, n = at
  c = seq_k // 4
  t = (t0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)).astype(jnp.uint32)
  s = s0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  within = (n * np.uint32(seq_q) + t) * np.uint32(c) + (s & (c - 1)).astype(jnp.uint32)
  hi, lo = dropout.threefry2x32(words_ref[0], words_ref[1], within,
                                jnp.broadcast_to(b, shape))
  quarter = s >> (c.bit_length() - 1)
  bits = jnp.where(quarter == 0, hi >> 16, jnp.where(quarter == 1, hi & 0xFFFF,
                   jnp.where(quarter == 2, lo >> 16, lo & 0xFFFF)))
  return bits.astype(jnp.int32) < cfg.threshold


def _dot(a, b, contract: tuple[int, int]):
  precision = (jax.lax.Precision.HIGHEST if a.dtype == jnp.float32
               else jax.lax.Precision.DEFAULT)
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=jnp.float32, precision=precision)


def _column(x_1d, lanes: int):
  """A per-query vector as the [bq, lanes] statistics tile."""
  return jax.lax.broadcast_in_dim(x_1d, (x_1d.shape[0], lanes), (0,))


def _to_width(stat, width: int):
  """A [bq, lanes] statistic broadcastable against a [bq, width] block."""
  lanes = stat.shape[1]
  if lanes == 1 or lanes == width:
    return stat
  if width < lanes:
    return stat[:, :width]
  return jnp.concatenate([stat] * (width // lanes), axis=1)


def _scores(q, k, q_seg, kv_seg, scale):
  """Scaled q·k of a block with the disallowed pairs at the float32 minimum, and the mask.
  q_seg: [bq, lanes]; kv_seg: [sublanes, bk] (the first row is read)."""
  kv_row = kv_seg[:1]
  allowed = (_to_width(q_seg, kv_row.shape[1]) == kv_row) & (kv_row != 0)
  return jnp.where(allowed, _dot(q, k, (1, 1)) * scale, _NEG), allowed


def _fwd_kernel(words_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, m_ref, l_ref, *,
                cfg: Config, seq_q: int, seq_k: int):
  bq, bk, lanes = cfg.block_q, cfg.block_k, cfg.lanes
  t0 = pl.program_id(2) * bq
  q, q_seg = q_ref[...], qs_ref[...]
  scale = 1.0 / math.sqrt(q.shape[-1])
  at = _where(words_ref)

  def body(j, carry):
    m, l, acc = carry
    s0 = pl.multiple_of(j * bk, bk)
    v = v_ref[pl.ds(s0, bk), :]
    s, _ = _scores(q, k_ref[pl.ds(s0, bk), :], q_seg, ks_ref[:, pl.ds(s0, bk)], scale)
    m_new = jnp.maximum(m, _column(jnp.max(s, axis=1), lanes))
    p = jnp.exp(s - _to_width(m_new, bk))
    alpha = jnp.exp(m - m_new)
    l = l * alpha + _column(jnp.sum(p, axis=1), lanes)
    if cfg.rate > 0.0:
      keep = _keep(words_ref, at, cfg, seq_q, seq_k, t0, s0, p.shape)
      p = jnp.where(keep, p * cfg.keep_scale, 0.0)
    acc = acc * _to_width(alpha, acc.shape[1]) + _dot(p.astype(v.dtype), v, (1, 0))
    return m_new, l, acc

  init = (jnp.full((bq, lanes), -jnp.inf, jnp.float32), jnp.zeros((bq, lanes), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, seq_k // bk, body, init)
  o_ref[...] = (acc / _to_width(l, acc.shape[1])).astype(o_ref.dtype)
  # The row maximum and sum apart, not as log-sum-exp: for a query that sees no key both terms
  # sit at the float32 minimum, where m + log(l) rounds to m.
  m_ref[...] = m
  l_ref[...] = l


def _probs_grads(words_ref, at, cfg, seq_q, seq_k, t0, s0, q, k, v, do, q_seg, kv_seg, m, l,
                 delta):
  """For one [bq, bk] block: (dropped probabilities, d logits) of the backward pass."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  s, allowed = _scores(q, k, q_seg, kv_seg, scale)
  bk = s.shape[1]
  p = jnp.exp(s - _to_width(m, bk)) / _to_width(l, bk)
  dp = _dot(do, v, (1, 1))
  if cfg.rate > 0.0:
    keep = _keep(words_ref, at, cfg, seq_q, seq_k, t0, s0, p.shape)
    dropped = jnp.where(keep, p * cfg.keep_scale, 0.0)
    dp = jnp.where(keep, dp * cfg.keep_scale, 0.0)
  else:
    dropped = p
  ds = jnp.where(allowed, p * (dp - _to_width(delta, bk)) * scale, 0.0)
  return dropped, ds


def _dkv_kernel(words_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, m_ref, l_ref, delta_ref,
                dk_ref, dv_ref, *, cfg: Config, seq_q: int, seq_k: int):
  bq, bk = cfg.block_q, cfg.block_k
  s0 = pl.program_id(2) * bk
  k, v, kv_seg = k_ref[...], v_ref[...], ks_ref[...]
  at = _where(words_ref)

  def body(i, carry):
    dk, dv = carry
    t0 = pl.multiple_of(i * bq, bq)
    rows = pl.ds(t0, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    dropped, ds = _probs_grads(words_ref, at, cfg, seq_q, seq_k, t0, s0, q, k, v, do,
                               qs_ref[rows, :], kv_seg, m_ref[rows, :], l_ref[rows, :],
                               delta_ref[rows, :])
    dv = dv + _dot(dropped.astype(do.dtype), do, (0, 0))
    dk = dk + _dot(ds.astype(q.dtype), q, (0, 0))
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, seq_q // bq, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(words_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, m_ref, l_ref, delta_ref,
               dq_ref, *, cfg: Config, seq_q: int, seq_k: int):
  bq, bk = cfg.block_q, cfg.block_k
  t0 = pl.program_id(2) * bq
  q, do, q_seg = q_ref[...], do_ref[...], qs_ref[...]
  m, l, delta = m_ref[...], l_ref[...], delta_ref[...]
  at = _where(words_ref)

  def body(j, dq):
    s0 = pl.multiple_of(j * bk, bk)
    cols = pl.ds(s0, bk)
    k = k_ref[cols, :]
    _, ds = _probs_grads(words_ref, at, cfg, seq_q, seq_k, t0, s0, q, k, v_ref[cols, :], do, q_seg,
                         ks_ref[:, cols], m, l, delta)
    return dq + _dot(ds.astype(k.dtype), k, (1, 0))

  dq = jax.lax.fori_loop(0, seq_k // bk, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _specs(t, s, h, cfg: Config, blocked: str):
  """BlockSpecs for a grid (b, n, block index), blocked along the queries or the keys:
  q/k/v [B,N,T,H], query ids [B,T,lanes], key ids [B,sublanes,S], statistics [B,N,T,lanes]."""
  sq = pl.squeezed if hasattr(pl, "squeezed") else None
  lanes, sub = cfg.lanes, cfg.sublanes
  if blocked == "q":
    bq = cfg.block_q
    return dict(q=pl.BlockSpec((sq, sq, bq, h), lambda i, j, k: (i, j, k, 0)),
                k=pl.BlockSpec((sq, sq, s, h), lambda i, j, k: (i, j, 0, 0)),
                qs=pl.BlockSpec((sq, bq, lanes), lambda i, j, k: (i, k, 0)),
                ks=pl.BlockSpec((sq, sub, s), lambda i, j, k: (i, 0, 0)),
                row=pl.BlockSpec((sq, sq, bq, lanes), lambda i, j, k: (i, j, k, 0)))
  bk = cfg.block_k
  return dict(q=pl.BlockSpec((sq, sq, t, h), lambda i, j, k: (i, j, 0, 0)),
              k=pl.BlockSpec((sq, sq, bk, h), lambda i, j, k: (i, j, k, 0)),
              qs=pl.BlockSpec((sq, t, lanes), lambda i, j, k: (i, 0, 0)),
              ks=pl.BlockSpec((sq, sub, bk), lambda i, j, k: (i, 0, k)),
              row=pl.BlockSpec((sq, sq, t, lanes), lambda i, j, k: (i, j, 0, 0)))


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg: Config, matmuls: int, *args):
  """The pallas_call of one kernel. Its cost (`matmuls` products of 2·B·N·T·S·H FLOPs, one exp
  per score) is declared, so XLA's FLOP count (`bert-jax plan`) includes what it computes."""
  b, n, t, h = args[1].shape
  s = args[2].shape[2]
  cost = pl.CostEstimate(
      flops=matmuls * 2 * b * n * t * s * h, transcendentals=b * n * t * s,
      bytes_accessed=sum(x.size * x.dtype.itemsize for x in args)
      + sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(out_shape)))
  params = {}
  if cfg.smem:
    from jax.experimental.pallas import tpu as pltpu
    words_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
    params = dict(compiler_params=pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel")))
  else:
    words_spec = pl.BlockSpec((4,), lambda i, j, k: (0,))
    if cfg.triton:
      from jax.experimental.pallas import triton as plgpu
      params = dict(compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2))
  return pl.pallas_call(kernel, grid=grid, in_specs=[words_spec, *in_specs],
                        out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret,
                        cost_estimate=cost, **params)(*args)


def _segment_tiles(q_seg, kv_seg, cfg: Config):
  """[B,T] and [B,S] ids as the kernels read them: [B,T,lanes] and [B,sublanes,S]."""
  b, t = q_seg.shape
  return (jnp.broadcast_to(q_seg[:, :, None], (b, t, cfg.lanes)),
          jnp.broadcast_to(kv_seg[:, None, :], (b, cfg.sublanes, kv_seg.shape[1])))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def flash(q, k, v, q_seg, kv_seg, words, cfg: Config):
  """Attention of q [B,N,T,H] over k, v [B,N,S,H] as the segment ids [B,T], [B,S] allow, with
  the probabilities dropped at cfg.rate by the words [key0, key1, first row, first head]."""
  return _flash_fwd(q, k, v, q_seg, kv_seg, words, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, words, cfg: Config):
  b, n, t, h = q.shape
  s = k.shape[2]
  sp = _specs(t, s, h, cfg, "q")
  kernel = functools.partial(_fwd_kernel, cfg=cfg, seq_q=t, seq_k=s)
  row = jax.ShapeDtypeStruct((b, n, t, cfg.lanes), jnp.float32)
  out, m, l = _call(kernel, (b, n, t // cfg.block_q),
                    [sp["q"], sp["k"], sp["k"], sp["qs"], sp["ks"]],
                    [sp["q"], sp["row"], sp["row"]],
                    [jax.ShapeDtypeStruct(q.shape, q.dtype), row, row], cfg, 2,
                    words, q, k, v, *_segment_tiles(q_seg, kv_seg, cfg))
  # Only the first lane of the statistics is kept for the backward pass.
  return out, (q, k, v, q_seg, kv_seg, words, out, m[..., 0], l[..., 0])


def _flash_bwd(cfg: Config, residuals, d_out):
  q, k, v, q_seg, kv_seg, words, out, m, l = residuals
  b, n, t, h = q.shape
  s = k.shape[2]
  d_out = d_out.astype(q.dtype)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  stats = [jnp.broadcast_to(x[..., None], (b, n, t, cfg.lanes)) for x in (m, l, delta)]
  args = (words, q, k, v, *_segment_tiles(q_seg, kv_seg, cfg), d_out, *stats)
  sk = _specs(t, s, h, cfg, "k")
  dk, dv = _call(functools.partial(_dkv_kernel, cfg=cfg, seq_q=t, seq_k=s),
                 (b, n, s // cfg.block_k),
                 [sk["q"], sk["k"], sk["k"], sk["qs"], sk["ks"], sk["q"]] + [sk["row"]] * 3,
                 [sk["k"], sk["k"]],
                 [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                 cfg, 4, *args)  # q·k again, dv, dp, dk
  sq = _specs(t, s, h, cfg, "q")
  dq = _call(functools.partial(_dq_kernel, cfg=cfg, seq_q=t, seq_k=s),
             (b, n, t // cfg.block_q),
             [sq["q"], sq["k"], sq["k"], sq["qs"], sq["ks"], sq["q"]] + [sq["row"]] * 3,
             sq["q"], jax.ShapeDtypeStruct(q.shape, q.dtype), cfg, 3, *args)  # q·k, dp, dq
  return dq, dk, dv, None, None, None


flash.defvjp(_flash_fwd, _flash_bwd)
