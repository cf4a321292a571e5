"""Attention without [B,N,T,S] tensors in memory: a flash-attention Pallas kernel with BERT's
attention dropout inside it, cuDNN's flash attention (GPU) and TPU splash attention where
nothing is dropped, and the choice between them and the unfused XLA path (`ops.attention` /
`ops.dropout_attention`).

Which keys a query sees is given by segment ids: query t attends key s when
q_seg[t] == kv_seg[s] and kv_seg[s] != 0. A padded batch is q_seg = 1, kv_seg = its attention
mask; packed rows (model.Packed) give each sequence its own number, padding 0. A query that sees
no key gets the mean of all values, as the XLA path's softmax over all-masked logits gives.

Dropout in the kernel draws the very bits `dropout.keep_mask` draws for the [B,N,T,S]
probabilities (the same Threefry counters, hashed per element inside the kernel instead of
written out), so the fused and unfused paths train identically for a given key; the bits of
an element depend on its global (b, n, t, s), whatever the mesh.

The kernel is chosen by the platform of the mesh the step is traced under (`target_platform`),
so `bert-jax plan` compiles the TPU path on any host. On TPUs the Pallas kernel (its TPU layout
checked in interpret mode; compiled, never yet run on a chip) trains the paper's recipe. On an
H200 it computes what the XLA path computes (its tests pass there), but a BERT-base step through
it did not finish compiling and running within 150 s (README): until it is measured there, `auto`
takes it nowhere on GPUs, which train attention dropout through the XLA path and say so in the
run's log; the fast recipe (attention dropout 0, configs/bert_base_fast.py) is fused there.
cuDNN reads a padding mask as lengths: padding at the end, as every batch made here.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from bert_jax import dropout, ops
from bert_jax.config import ATTENTIONS

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ATTENTIONS
_NEG = float(np.finfo(np.float32).min)
_MIN_BLOCK = 16  # Triton's smallest dot operand side


class Segments(NamedTuple):
  """Segment ids of the queries [B, T] (None: all 1) and keys [B, S]."""
  q_BT: jax.Array | None
  kv_BS: jax.Array

  def mask(self) -> jax.Array:
    """The boolean mask of the XLA path: [B, 1, 1, S] for a padded batch, else [B, 1, T, S]."""
    kv = self.kv_BS[:, None, None, :]
    if self.q_BT is None:
      return kv != 0
    return (self.q_BT[:, None, :, None] == kv) & (kv != 0)

  def queries(self, t: int) -> jax.Array:
    return jnp.ones((self.kv_BS.shape[0], t), jnp.int32) if self.q_BT is None else self.q_BT


# ----------------------------------------------------------------------------- choice

def target_platform() -> str:
  """The platform of the mesh being traced under (a TPU topology's in `bert-jax plan`), else
  jax's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def choose(implementation: str, platform: str, rate: float, training: bool,
           shape: tuple[int, int, int], dtype: str = "bfloat16", packed: bool = False) -> str:
  """The path one attention call takes: "xla", "pallas", "splash" or "cudnn". `shape` is
  (T, S, H). "auto" fuses where a kernel fits: on TPUs splash, or the Pallas kernel when
  attention dropout is on; on GPUs cuDNN (16-bit, padded rows) when nothing is dropped; the
  XLA path elsewhere and for shapes the kernels do not take."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}: expected one of "
                     f"{', '.join(IMPLEMENTATIONS)}")
  t, s, h = shape
  dropping = training and rate > 0.0
  power_of_two = lambda x: x >= _MIN_BLOCK and x & (x - 1) == 0
  # The dropout counters need power-of-two lengths; TPU blocks are whole 128-key tiles with any
  # head width, Triton's are powers of two throughout.
  fits_pallas = power_of_two(t) and power_of_two(s) and (
      t % 128 == 0 and s % 128 == 0 if platform == "tpu" else power_of_two(h))
  fits_splash = t % 128 == 0 and s % 128 == 0
  fits_cudnn = dtype in ("bfloat16", "float16") and not packed and h <= 128 and h % 8 == 0
  if implementation == "auto":
    if platform == "gpu" and fits_cudnn and not dropping:
      return "cudnn"
    if platform == "tpu" and fits_splash:
      return "pallas" if dropping and fits_pallas else "splash"
    return "xla"
  if implementation in ("splash", "cudnn") and dropping:
    raise ValueError(f"attention {implementation} has no dropout: set "
                     "attention_probs_dropout_prob=0 (the fast recipe) or attention=auto")
  if implementation == "pallas" and not fits_pallas:
    return "xla"
  return implementation


def describe(implementation: str, platform: str, rate: float, dtype: str = "bfloat16") -> str:
  """One line for a run's log: the attention path training takes at full length, and its
  dropout."""
  train = choose(implementation, platform, rate, True, (128, 128, 64), dtype)
  evaluate = choose(implementation, platform, rate, False, (128, 128, 64), dtype)
  where = {"pallas": "fused Pallas kernel", "splash": "fused splash kernel",
           "cudnn": "fused cuDNN kernel", "xla": "unfused XLA"}
  if rate > 0.0:
    drop = (f"attention dropout {rate} inside the kernel" if train == "pallas"
            else f"attention dropout {rate} on materialised probabilities")
  else:
    drop = "no attention dropout"
  return (f"attention on {platform}: training {where[train]} ({drop}), evaluation "
          f"{where[evaluate]}")


def attend(q_BTNH, k_BSNH, v_BSNH, segments: Segments, *, rate: float = 0.0,
           key: jax.Array | None = None, implementation: str = "auto"):
  """softmax(q·k/sqrt(H) over the keys `segments` allows) · v, with inverted dropout of the
  probabilities at `rate` when `key` is given."""
  t, n, h = q_BTNH.shape[1:]
  training = key is not None and rate > 0.0
  path = choose(implementation, target_platform(), rate, training, (t, k_BSNH.shape[1], h),
                jnp.dtype(q_BTNH.dtype).name, segments.q_BT is not None)
  if path == "xla":
    mask = segments.mask()
    if not training:
      return ops.attention(q_BTNH, k_BSNH, v_BSNH, mask)
    keep, scale = dropout.keep_mask(key, (q_BTNH.shape[0], n, t, k_BSNH.shape[1]), rate)
    return ops.dropout_attention(q_BTNH, k_BSNH, v_BSNH, mask, keep, scale)
  if path == "splash":
    return _splash(q_BTNH, k_BSNH, v_BSNH, segments)
  if path == "cudnn":
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSNH, v_BSNH, implementation="cudnn",
        key_value_seq_lengths=jnp.sum(segments.kv_BS != 0, axis=1, dtype=jnp.int32))
  words = dropout.key_words_of(key) if training else jnp.zeros((2,), jnp.uint32)
  # On a CPU (attention="pallas" asked for by name: tests) the kernel runs interpreted.
  return flash_attention(q_BTNH, k_BSNH, v_BSNH, segments.queries(t), segments.kv_BS, words,
                         rate=rate if training else 0.0,
                         interpret=target_platform() == "cpu")


# ----------------------------------------------------------------------------- sharding

def _batch_head_specs(b: int, n: int):
  """Mesh axes for the batch and head dimensions inside shard_map: the rules' (data, fsdp)
  and tensor where they divide the dimension, else replicated."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return mesh, (), ()
  batch = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
  batch = batch if batch and b % math.prod(mesh.shape[a] for a in batch) == 0 else ()
  heads = ("tensor",) if "tensor" in mesh.shape and n % mesh.shape["tensor"] == 0 else ()
  return mesh, batch, heads


def _axis_offset(axes: tuple[str, ...], local: int):
  return jax.lax.axis_index(axes) * local if axes else 0


def flash_attention(q_BTNH, k_BSNH, v_BSNH, q_seg_BT, kv_seg_BS, words, *, rate: float = 0.0,
                    interpret: bool = False, layout: str | None = None, block_q: int = 128,
                    block_k: int | None = None):
  """The Pallas kernel over the whole batch: under a mesh, each device runs it on its own rows
  and heads (shard_map), with the global row and head offsets that keep the dropout bits
  mesh-independent. `layout` ("tpu" or "gpu"; default: the traced platform's) shapes the
  per-query statistics and segment ids for the chip's vector tiles; tests interpret both."""
  b, t, n, h = q_BTNH.shape
  to_bnth = lambda x: jnp.transpose(x, (0, 2, 1, 3))
  q, k, v = to_bnth(q_BTNH), to_bnth(k_BSNH), to_bnth(v_BSNH)
  tpu = (layout or target_platform()) == "tpu"
  # TPU: statistics as [rows, 128] lane tiles and key ids as [8, keys] sublane tiles (as splash
  # keeps them), key blocks of one lane tile; elsewhere plain columns and rows.
  cfg = _Config(rate=rate, interpret=interpret, block_q=min(block_q, t),
                block_k=min(block_k or (128 if tpu else 64), k.shape[2]),
                lanes=128 if tpu else 1, sublanes=8 if tpu else 1,
                smem=tpu and not interpret)
  mesh, batch, heads = _batch_head_specs(b, n)
  q_seg_BT, kv_seg_BS = q_seg_BT.astype(jnp.int32), kv_seg_BS.astype(jnp.int32)
  if not batch and not heads:
    return to_bnth(_flash(q, k, v, q_seg_BT, kv_seg_BS, _offset_words(words, 0, 0), cfg))
  from jax.sharding import PartitionSpec as P
  b_axes, n_axes = batch or None, heads or None

  def local(q, k, v, qs, kvs, words):
    offsets = (_axis_offset(batch, q.shape[0]), _axis_offset(heads, q.shape[1]))
    return _flash(q, k, v, qs, kvs, _offset_words(words, *offsets), cfg)

  qkv = P(b_axes, n_axes, None, None)
  seg = P(b_axes, None)
  out = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg, P()),
                      out_specs=qkv, check_vma=False)(q, k, v, q_seg_BT, kv_seg_BS, words)
  return to_bnth(out)


def _offset_words(words, b_offset, n_offset):
  """[key0, key1, first row, first head] as uint32."""
  offsets = jnp.stack([jnp.asarray(b_offset, jnp.uint32), jnp.asarray(n_offset, jnp.uint32)])
  return jnp.concatenate([words.astype(jnp.uint32), offsets])


# ----------------------------------------------------------------------------- the kernel

class _Config(NamedTuple):
  rate: float
  interpret: bool
  block_q: int
  block_k: int
  lanes: int  # width of a query's statistics and segment id: 128 (a TPU lane tile) or 1
  sublanes: int  # height of the key segment ids: 8 (a TPU sublane tile) or 1
  smem: bool  # the dropout words in scalar memory (TPU)

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


def _keep(words_ref, at: _Where, cfg: _Config, seq_q: int, seq_k: int, t0, s0, shape):
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
                cfg: _Config, seq_q: int, seq_k: int):
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
                dk_ref, dv_ref, *, cfg: _Config, seq_q: int, seq_k: int):
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
               dq_ref, *, cfg: _Config, seq_q: int, seq_k: int):
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


def _specs(t, s, h, cfg: _Config, blocked: str):
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


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg: _Config, matmuls: int, *args):
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
    if not cfg.interpret and target_platform() == "gpu":
      from jax.experimental.pallas import triton as plgpu
      params = dict(compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2))
  return pl.pallas_call(kernel, grid=grid, in_specs=[words_spec, *in_specs],
                        out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret,
                        cost_estimate=cost, **params)(*args)


def _segment_tiles(q_seg, kv_seg, cfg: _Config):
  """[B,T] and [B,S] ids as the kernels read them: [B,T,lanes] and [B,sublanes,S]."""
  b, t = q_seg.shape
  return (jnp.broadcast_to(q_seg[:, :, None], (b, t, cfg.lanes)),
          jnp.broadcast_to(kv_seg[:, None, :], (b, cfg.sublanes, kv_seg.shape[1])))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_seg, kv_seg, words, cfg: _Config):
  return _flash_fwd(q, k, v, q_seg, kv_seg, words, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, words, cfg: _Config):
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


def _flash_bwd(cfg: _Config, residuals, d_out):
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


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- TPU splash

def _splash(q_BTNH, k_BSNH, v_BSNH, segments: Segments):
  """TPU splash attention (full mask, segment ids), one kernel per row under vmap, inside
  shard_map over the batch and heads as the Pallas path."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  from jax.sharding import PartitionSpec as P
  b, t, n, h = q_BTNH.shape
  s = k_BSNH.shape[1]
  to_bnth = lambda x: jnp.transpose(x, (0, 2, 1, 3))
  q = to_bnth(q_BTNH) * jnp.asarray(1.0 / math.sqrt(h), q_BTNH.dtype)
  k, v = to_bnth(k_BSNH), to_bnth(v_BSNH)
  q_seg, kv_seg = segments.queries(t).astype(jnp.int32), segments.kv_BS.astype(jnp.int32)
  mesh, batch, heads = _batch_head_specs(b, n)
  local_n = n // (mesh.shape["tensor"] if heads else 1)

  def local(q, k, v, qs, kvs):
    mask = splash.MultiHeadMask([splash.FullMask((t, s)) for _ in range(local_n)])
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1)
    return jax.vmap(lambda q, k, v, qs, kvs: kernel(q, k, v, splash.SegmentIds(qs, kvs)))(
        q, k, v, qs, kvs)

  if batch or heads:
    qkv, seg = P(batch or None, heads or None, None, None), P(batch or None, None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg),
                          out_specs=qkv, check_vma=False)
  return to_bnth(local(q, k, v, q_seg, kv_seg).astype(v_BSNH.dtype))
