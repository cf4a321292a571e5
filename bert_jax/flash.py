"""A flash-attention Pallas kernel with BERT's attention dropout inside it: forward, dK/dV and
dQ kernels over blocks of queries and keys, no [B,N,T,S] tensor in memory.

Dropout draws the very bits `dropout.keep_mask` draws for the [B,N,T,S] probabilities: the
same Threefry counters, hashed per element inside the kernel from the element's global
(b, n, t, s). Two layouts of the per-query segment ids and statistics: TPU vector tiles (query
ids in 128 lanes, key ids in 8 sublanes, key blocks of 128, statistics as rows along the lanes)
and plain columns and rows (Triton on GPUs). Where it is used, and how it is sharded, is
`bert_jax.attention`'s business.

Between the forward and the backward pass one float32 per query is kept: the log-sum-exp of its
scores (as splash and FlashAttention-2 keep it); the backward's delta = rowsum(dO * O) is one
more. Both enter the kernels as [B,N,1,T] rows on a TPU (a few MiB, where [B,N,T,128] lane tiles
were 64 MiB per statistic for BERT-large at 512 on a v5e-16), as [B,N,T,1] columns elsewhere.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from bert_jax import dropout

_NEG = float(np.finfo(np.float32).min)


class Config(NamedTuple):
  rate: float
  interpret: bool
  block_q: int
  block_k: int
  lanes: int  # width of a query's segment id: 128 (a TPU lane tile; statistics as rows) or 1
  sublanes: int  # height of the key segment ids: 8 (a TPU sublane tile) or 1
  smem: bool  # the dropout words in scalar memory (TPU)
  triton: bool  # compiled by Triton (GPU)

  @property
  def threshold(self) -> int:
    return dropout.keep_threshold(self.rate)

  @property
  def keep_scale(self) -> float:
    return 65536.0 / self.threshold

  @property
  def rows(self) -> bool:
    """Per-query statistics as rows [1, T] (TPU: the lanes hold the queries) or columns [T, 1]."""
    return self.lanes > 1


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
  """A per-query vector as the [bq, lanes] tile the forward kernel carries."""
  return jax.lax.broadcast_in_dim(x_1d, (x_1d.shape[0], lanes), (0,))


def _to_width(stat, width: int):
  """A [bq, lanes] tile or [bq, 1] column broadcastable against a [bq, width] block."""
  lanes = stat.shape[1]
  if lanes == 1 or lanes == width:
    return stat
  if width < lanes:
    return stat[:, :width]
  return jnp.concatenate([stat] * (width // lanes), axis=1)


def _stat_column(ref, start, size: int, cfg: Config):
  """Queries start .. start+size of a per-query statistic as a [size, 1] column, read from a
  row ref [1, T] (TPU: a lane-to-sublane relayout of one vector, as splash's dq kernel does) or
  a column ref [T, 1]."""
  if cfg.rows:
    return jnp.expand_dims(ref[0, pl.ds(start, size)], -1)
  return ref[pl.ds(start, size), :]


def _scores(q, k, q_seg, kv_seg, scale):
  """Scaled q·k of a block with the disallowed pairs at the float32 minimum, and the mask.
  q_seg: [bq, lanes]; kv_seg: [sublanes, bk] (the first row is read)."""
  kv_row = kv_seg[:1]
  allowed = (_to_width(q_seg, kv_row.shape[1]) == kv_row) & (kv_row != 0)
  return jnp.where(allowed, _dot(q, k, (1, 1)) * scale, _NEG), allowed


def _fwd_kernel(words_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *,
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
  # For a query that sees no key, m is the float32 minimum and m + log(l) rounds to it: the
  # backward pass reads that as "no key" (`_probs`).
  lse = m + jnp.log(l)
  # TPU: the [bq, 128] tile (every lane alike) turned on its side gives the row [1, bq].
  lse_ref[...] = jnp.transpose(lse)[:1, :] if cfg.rows else lse


def _probs(s, lse, seq_k: int):
  """The softmax probabilities of a block of scores from the queries' log-sum-exp [bq, 1]. A
  query that sees no key (log-sum-exp at the float32 minimum, every score too) has exp(0) = 1
  for each key, where its softmax is 1/S."""
  no_key = jnp.where(lse <= 0.5 * _NEG, 1.0 / seq_k, 1.0)
  return jnp.exp(s - lse) * no_key


def _probs_grads(words_ref, at, cfg, seq_q, seq_k, t0, s0, q, k, v, do, q_seg, kv_seg, lse,
                 delta):
  """For one [bq, bk] block: (dropped probabilities, d logits) of the backward pass; lse and
  delta are [bq, 1] columns."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  s, allowed = _scores(q, k, q_seg, kv_seg, scale)
  p = _probs(s, lse, seq_k)
  dp = _dot(do, v, (1, 1))
  if cfg.rate > 0.0:
    keep = _keep(words_ref, at, cfg, seq_q, seq_k, t0, s0, p.shape)
    dropped = jnp.where(keep, p * cfg.keep_scale, 0.0)
    dp = jnp.where(keep, dp * cfg.keep_scale, 0.0)
  else:
    dropped = p
  ds = jnp.where(allowed, p * (dp - delta) * scale, 0.0)
  return dropped, ds


def _dkv_kernel(words_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
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
                               qs_ref[rows, :], kv_seg, _stat_column(lse_ref, t0, bq, cfg),
                               _stat_column(delta_ref, t0, bq, cfg))
    dv = dv + _dot(dropped.astype(do.dtype), do, (0, 0))
    dk = dk + _dot(ds.astype(q.dtype), q, (0, 0))
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, seq_q // bq, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(words_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, cfg: Config, seq_q: int, seq_k: int):
  bq, bk = cfg.block_q, cfg.block_k
  t0 = pl.program_id(2) * bq
  q, do, q_seg = q_ref[...], do_ref[...], qs_ref[...]
  lse, delta = _stat_column(lse_ref, 0, bq, cfg), _stat_column(delta_ref, 0, bq, cfg)
  at = _where(words_ref)

  def body(j, dq):
    s0 = pl.multiple_of(j * bk, bk)
    cols = pl.ds(s0, bk)
    k = k_ref[cols, :]
    _, ds = _probs_grads(words_ref, at, cfg, seq_q, seq_k, t0, s0, q, k, v_ref[cols, :], do, q_seg,
                         ks_ref[:, cols], lse, delta)
    return dq + _dot(ds.astype(k.dtype), k, (1, 0))

  dq = jax.lax.fori_loop(0, seq_k // bk, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _specs(t, s, h, cfg: Config, blocked: str):
  """BlockSpecs for a grid (b, n, block index), blocked along the queries or the keys:
  q/k/v [B,N,T,H], query ids [B,T,lanes], key ids [B,sublanes,S], statistics [B,N,1,T] rows
  (TPU) or [B,N,T,1] columns."""
  sq = pl.squeezed if hasattr(pl, "squeezed") else None
  lanes, sub = cfg.lanes, cfg.sublanes
  if blocked == "q":
    bq = cfg.block_q
    stat = (pl.BlockSpec((sq, sq, 1, bq), lambda i, j, k: (i, j, 0, k)) if cfg.rows
            else pl.BlockSpec((sq, sq, bq, 1), lambda i, j, k: (i, j, k, 0)))
    return dict(q=pl.BlockSpec((sq, sq, bq, h), lambda i, j, k: (i, j, k, 0)),
                k=pl.BlockSpec((sq, sq, s, h), lambda i, j, k: (i, j, 0, 0)),
                qs=pl.BlockSpec((sq, bq, lanes), lambda i, j, k: (i, k, 0)),
                ks=pl.BlockSpec((sq, sub, s), lambda i, j, k: (i, 0, 0)), stat=stat)
  bk = cfg.block_k
  return dict(q=pl.BlockSpec((sq, sq, t, h), lambda i, j, k: (i, j, 0, 0)),
              k=pl.BlockSpec((sq, sq, bk, h), lambda i, j, k: (i, j, k, 0)),
              qs=pl.BlockSpec((sq, t, lanes), lambda i, j, k: (i, 0, 0)),
              ks=pl.BlockSpec((sq, sub, bk), lambda i, j, k: (i, 0, k)),
              stat=pl.BlockSpec((sq, sq) + ((1, t) if cfg.rows else (t, 1)),
                                lambda i, j, k: (i, j, 0, 0)))


def _stat_shape(b: int, n: int, t: int, cfg: Config) -> tuple[int, ...]:
  return (b, n, 1, t) if cfg.rows else (b, n, t, 1)


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
  the probabilities dropped at cfg.rate by the words [key0, key1, first row, first head]; the
  output [B,T,N,H], as the output projection reads it, so that the output the backward pass
  keeps is the very array the model keeps (not a [B,N,T,H] copy, its H = 64 padded to 128
  lanes on a TPU)."""
  return _flash_fwd(q, k, v, q_seg, kv_seg, words, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, words, cfg: Config):
  b, n, t, h = q.shape
  s = k.shape[2]
  sp = _specs(t, s, h, cfg, "q")
  kernel = functools.partial(_fwd_kernel, cfg=cfg, seq_q=t, seq_k=s)
  out, lse = _call(kernel, (b, n, t // cfg.block_q),
                   [sp["q"], sp["k"], sp["k"], sp["qs"], sp["ks"]], [sp["q"], sp["stat"]],
                   [jax.ShapeDtypeStruct(q.shape, q.dtype),
                    jax.ShapeDtypeStruct(_stat_shape(b, n, t, cfg), jnp.float32)], cfg, 2,
                   words, q, k, v, *_segment_tiles(q_seg, kv_seg, cfg))
  out_BTNH = jnp.transpose(out, (0, 2, 1, 3))
  return out_BTNH, (q, k, v, q_seg, kv_seg, words, out_BTNH, lse.reshape(b, n, t))


def _flash_bwd(cfg: Config, residuals, d_out_BTNH):
  q, k, v, q_seg, kv_seg, words, out_BTNH, lse = residuals
  b, n, t, h = q.shape
  s = k.shape[2]
  delta = jnp.transpose(jnp.sum(d_out_BTNH.astype(jnp.float32) * out_BTNH.astype(jnp.float32),
                                axis=-1), (0, 2, 1))
  d_out = jnp.transpose(d_out_BTNH.astype(q.dtype), (0, 2, 1, 3))
  stats = [x.reshape(_stat_shape(b, n, t, cfg)) for x in (lse, delta)]
  args = (words, q, k, v, *_segment_tiles(q_seg, kv_seg, cfg), d_out, *stats)
  sk = _specs(t, s, h, cfg, "k")
  dk, dv = _call(functools.partial(_dkv_kernel, cfg=cfg, seq_q=t, seq_k=s),
                 (b, n, s // cfg.block_k),
                 [sk["q"], sk["k"], sk["k"], sk["qs"], sk["ks"], sk["q"]] + [sk["stat"]] * 2,
                 [sk["k"], sk["k"]],
                 [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                 cfg, 4, *args)  # q·k again, dv, dp, dk
  sq = _specs(t, s, h, cfg, "q")
  dq = _call(functools.partial(_dq_kernel, cfg=cfg, seq_q=t, seq_k=s),
             (b, n, t // cfg.block_q),
             [sq["q"], sq["k"], sq["k"], sq["qs"], sq["ks"], sq["q"]] + [sq["stat"]] * 2,
             sq["q"], jax.ShapeDtypeStruct(q.shape, q.dtype), cfg, 3, *args)  # q·k, dp, dq
  return dq, dk, dv, None, None, None


flash.defvjp(_flash_fwd, _flash_bwd)
