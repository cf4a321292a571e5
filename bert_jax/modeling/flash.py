"""A flash-attention Pallas kernel with BERT's attention dropout inside it: forward, dK/dV and
dQ kernels over blocks of queries and keys, no [B,N,T,S] tensor in memory.

Dropout draws the very bits `dropout.keep_mask` draws for the [B,N,T,S] probabilities: the same
Threefry counters, hashed inside the kernel from the element's global (b, n, t, s), one hash for
the four keys that share a counter where blocks allow (`kernel_dropout.groups`). The forward
kernel also writes the bits, packed 32 queries to a word (16 in TPU tiles), and the backward
kernels read them instead of hashing again (`kernel_dropout.packs_keep`). Two layouts: TPU
vector tiles (q, k and v as [B,N,T,H] arrays; per-query statistics in 128 lanes, key ids in 8
sublanes, key blocks of 128), and plain columns and rows (Triton on GPUs) reading the model's
fused [B,T,3,N,H] projection in place and writing its gradient in place (`Config.fused`). Where
it is used, and how it is sharded, is `bert_jax.modeling.attention`'s business.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from bert_jax.modeling import dropout, kernel_dropout

_NEG = float(np.finfo(np.float32).min)
# The order along the fused array's axis 2: the dK/dV kernel writes keys and values as one
# block of two at its start, then the dQ kernel writes the queries into the same buffer.
KEYS, VALUES, QUERIES = 0, 1, 2


class Config(NamedTuple):
  rate: float
  interpret: bool
  block_q: int
  block_k: int
  lanes: int  # width of a query's statistics and segment id: 128 (a TPU lane tile) or 1
  sublanes: int  # height of the key segment ids: 8 (a TPU sublane tile) or 1
  smem: bool  # the dropout words in scalar memory (TPU)
  triton: bool  # compiled by Triton (GPU)
  # q, k and v as one [B,T,3,N,H] array (KEYS, VALUES, QUERIES), the model's projection, and
  # the output as [B,T,N,H], each block a head's rows read strided: no slices, transposes or
  # concatenates around the kernels (plain layout); else separate [B,N,T,H] arrays (TPU blocks
  # are whole tiles of one head)
  fused: bool = False

  @property
  def threshold(self) -> int:
    return dropout.keep_threshold(self.rate)

  @property
  def keep_scale(self) -> float:
    return 65536.0 / self.threshold


def _dims(qkv, cfg: Config) -> tuple[int, int, int, int, int]:
  """(B, N, T, S, H) of the fused array, or of the (q, k, v) arrays."""
  if cfg.fused:
    b, t, _, n, h = qkv.shape
    return b, n, t, t, h
  (b, n, t, h), s = qkv[0].shape, qkv[1].shape[2]
  return b, n, t, s, h


def _operands(qkv, cfg: Config) -> list:
  """q, k and v as the kernels take them: the fused array three times (each read at its own
  index, see `_specs`), or the three arrays."""
  return [qkv] * 3 if cfg.fused else list(qkv)


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


def _scores(a, b, a_ids, b_ids, scale):
  """Scaled a·b of a block (queries by keys, or keys by queries) with the disallowed pairs at
  the float32 minimum, and the mask. a_ids: [rows of a, lanes]; b_ids: [sublanes, rows of b]
  (the first row is read). A pair is allowed when its ids are equal and not 0 (padding)."""
  b_row = b_ids[:1]
  allowed = (_to_width(a_ids, b_row.shape[1]) == b_row) & (b_row != 0)
  return jnp.where(allowed, _dot(a, b, (1, 1)) * scale, _NEG), allowed


class _Biased(NamedTuple):
  """q, k or v in a kernel where the projection's bias ([1, H], read once) is added as its rows
  are read (the unbiased projection is the kernel's operand: no separate pass adds the bias)."""
  ref: object
  bias: jax.Array

  @property
  def shape(self):
    return self.ref.shape

  def __getitem__(self, index):
    x = self.ref[index]
    return x + self.bias.astype(x.dtype)


def _reading_biases(kernel):
  """The kernel (a partial of one below) taking the biases of q and v as its two inputs after
  v; named as the kernel, which profiles (tools/kernel_profile.py) look for. The keys' bias is
  not added: it adds q_t·b_k to every score of query t, which the softmax takes away, so no
  probability, output or gradient depends on it (its gradient, the sum of dK, is zero but for
  rounding, as on the XLA path)."""
  def biased(words_ref, q_ref, k_ref, v_ref, q_bias, v_bias, *refs):
    row = lambda ref: ref[...][None, :]
    return kernel(words_ref, _Biased(q_ref, row(q_bias)), k_ref, _Biased(v_ref, row(v_bias)),
                  *refs)
  biased.__name__ = kernel.func.__name__
  return biased


def _fwd_kernel(words_ref, q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, o_ref, m_ref, l_ref,
                *bits_ref, cfg: Config, seq_q: int, seq_k: int):
  """bits_ref (where packs_keep): the block's keep bits, [bq/w, S] words
  (`kernel_dropout.per_word`)."""
  bq, bk, lanes = cfg.block_q, cfg.block_k, cfg.lanes
  t0 = pl.program_id(2) * bq
  q, q_ids = q_ref[...], q_ids_ref[...]
  scale = 1.0 / math.sqrt(q.shape[-1])
  at = kernel_dropout.where(words_ref)
  quarters = kernel_dropout.groups(cfg, seq_k)

  def body(j, carry):
    keeps = kernel_dropout.keeps(words_ref, at, cfg, seq_q, seq_k, t0, j, (bq, bk))
    for g, keep in enumerate(keeps):
      m, l, acc = carry
      s0 = kernel_dropout.block_start(cfg, seq_k, j, g)
      v = v_ref[pl.ds(s0, bk), :]
      s, _ = _scores(q, k_ref[pl.ds(s0, bk), :], q_ids, kv_ids_ref[:, pl.ds(s0, bk)], scale)
      m_new = jnp.maximum(m, _column(jnp.max(s, axis=1), lanes))
      p = jnp.exp(s - _to_width(m_new, bk))
      alpha = jnp.exp(m - m_new)
      l = l * alpha + _column(jnp.sum(p, axis=1), lanes)
      if keep is not None:
        p = jnp.where(keep, p * cfg.keep_scale, 0.0)
        if bits_ref:
          bits_ref[0][:, pl.ds(s0, bk)] = kernel_dropout.pack(keep, kernel_dropout.per_word(cfg))
      acc = acc * _to_width(alpha, acc.shape[1]) + _dot(p.astype(v.dtype), v, (1, 0))
      carry = m_new, l, acc
    return carry

  init = (jnp.full((bq, lanes), -jnp.inf, jnp.float32), jnp.zeros((bq, lanes), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, seq_k // (bk * quarters), body, init)
  o_ref[...] = (acc / _to_width(l, acc.shape[1])).astype(o_ref.dtype)
  # The row maximum and sum apart, not as log-sum-exp: for a query that sees no key both terms
  # sit at the float32 minimum, where m + log(l) rounds to m.
  m_ref[...] = m
  l_ref[...] = l


def _probs_grads(cfg, q, k, v, do, q_ids, kv_ids, m, l, delta, keep, keys_first: bool):
  """For one block: (dropped probabilities, d logits) of the backward pass, as [bq, bk], or as
  [bk, bq] keys first. Query first, q_ids and the statistics are [bq, lanes] column tiles and
  kv_ids a [sublanes, bk] row tile; keys first, kv_ids is the column tile and q_ids and the
  statistics [sublanes, bq] row tiles. `keep`: the block's kept elements (None: no dropout)."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  if keys_first:
    s, allowed = _scores(k, q, kv_ids, q_ids, scale)
    dp = _dot(v, do, (1, 1))
    per_query = lambda x: x[:1]
  else:
    s, allowed = _scores(q, k, q_ids, kv_ids, scale)
    dp = _dot(do, v, (1, 1))
    per_query = lambda x: _to_width(x, s.shape[1])
  p = jnp.exp(s - per_query(m)) / per_query(l)
  dropped = p
  if keep is not None:
    dropped = jnp.where(keep, p * cfg.keep_scale, 0.0)
    dp = jnp.where(keep, dp * cfg.keep_scale, 0.0)
  ds = jnp.where(allowed, p * (dp - per_query(delta)) * scale, 0.0)
  return dropped, ds


def _dkv_kernel(words_ref, q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, m_ref, l_ref,
                delta_ref, *refs, cfg: Config, seq_q: int, seq_k: int):
  """dK and dV of key block j in each of the groups(...) quarters (dk_ref: [quarters, bk, H]),
  over [bk, bq] blocks (keys first): both products then take the block as it is. (Query first,
  they take it transposed, and XLA's Triton spends minutes compiling the dropout hash feeding a
  transposed operand; the key-major block compiles in about a second.) refs: the forward's
  keep bits ([T/w, S] words, where packs_keep), then dk_ref and dv_ref, or where cfg.fused one
  [quarters, bk, 2, H] block of both (KEYS, VALUES)."""
  outputs = 1 if cfg.fused else 2
  bits_ref, grads_ref = refs[:-outputs], refs[-outputs:]
  bq, bk = cfg.block_q, cfg.block_k
  j = pl.program_id(2)
  at = kernel_dropout.where(words_ref)
  quarters = kernel_dropout.groups(cfg, seq_k)

  def body(i, carry):
    t0 = pl.multiple_of(i * bq, bq)
    rows, cols = pl.ds(t0, bq), (slice(None), pl.ds(t0, bq))
    q, do = q_ref[rows, :], do_ref[rows, :]
    q_ids, m, l, delta = (ref[cols] for ref in (q_ids_ref, m_ref, l_ref, delta_ref))
    keeps = kernel_dropout.backward_keeps(words_ref, bits_ref, at, cfg, seq_q, seq_k, i, j,
                                          keys_first=True)
    out = []
    for g, keep in enumerate(keeps):
      dk, dv = carry[g]
      keys = pl.ds(kernel_dropout.block_start(cfg, seq_k, j, g), bk)
      dropped, ds = _probs_grads(cfg, q, k_ref[keys, :], v_ref[keys, :], do, q_ids,
                                 kv_ids_ref[keys, :], m, l, delta, keep, keys_first=True)
      out.append((dk + _dot(ds.astype(q.dtype), q, (1, 0)),
                  dv + _dot(dropped.astype(do.dtype), do, (1, 0))))
    return tuple(out)

  zeros = jnp.zeros((bk, k_ref.shape[-1]), jnp.float32)
  grads = jax.lax.fori_loop(0, seq_q // bq, body, ((zeros, zeros),) * quarters)
  for g, (dk, dv) in enumerate(grads):
    if cfg.fused:
      grads_ref[0][g, :, KEYS, :] = dk.astype(grads_ref[0].dtype)
      grads_ref[0][g, :, VALUES, :] = dv.astype(grads_ref[0].dtype)
    else:
      grads_ref[0][g] = dk.astype(grads_ref[0].dtype)
      grads_ref[1][g] = dv.astype(grads_ref[1].dtype)


def _dq_kernel(words_ref, q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, m_ref, l_ref,
               delta_ref, *refs, cfg: Config, seq_q: int, seq_k: int):
  """refs: the forward's keep bits ([bq/w, S] words, where packs_keep), where cfg.fused the
  dK/dV kernel's output (the buffer dq_ref writes into, not read), then dq_ref."""
  bits_ref, dq_ref = refs[:-2 if cfg.fused else -1], refs[-1]
  bk = cfg.block_k
  i = pl.program_id(2)
  q, do, q_ids = q_ref[...], do_ref[...], q_ids_ref[...]
  m, l, delta = m_ref[...], l_ref[...], delta_ref[...]
  at = kernel_dropout.where(words_ref)
  quarters = kernel_dropout.groups(cfg, seq_k)

  def body(j, dq):
    keeps = kernel_dropout.backward_keeps(words_ref, bits_ref, at, cfg, seq_q, seq_k, i, j,
                                          keys_first=False)
    for g, keep in enumerate(keeps):
      cols = pl.ds(kernel_dropout.block_start(cfg, seq_k, j, g), bk)
      k = k_ref[cols, :]
      _, ds = _probs_grads(cfg, q, k, v_ref[cols, :], do, q_ids, kv_ids_ref[:, cols], m, l,
                           delta, keep, keys_first=False)
      dq = dq + _dot(ds.astype(k.dtype), k, (1, 0))
    return dq

  dq = jax.lax.fori_loop(0, seq_k // (bk * quarters), body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _specs(t, s, h, cfg: Config, blocked: str):
  """BlockSpecs for a grid (b, n, block index), blocked along the queries (the forward and dQ
  kernels: query ids [B,T,lanes] and statistics [B,N,T,lanes] as column tiles, key ids
  [B,sublanes,S] as a row tile) or the keys (the dK/dV kernel, keys first: key ids
  [B,S,lanes] as the column tile, query ids [B,sublanes,T] and statistics [B,N,sublanes,T] as
  row tiles; one instance reads block j of each quarter of the keys and writes dK and dV as
  [B,N,quarters,S/quarters,H], see `groups`, or where cfg.fused both as
  [B,quarters,S/quarters,3,N,H], the first two of axis 3). q, k, v: see `Config.fused`."""
  sq = pl.squeezed if hasattr(pl, "squeezed") else None
  lanes, sub = cfg.lanes, cfg.sublanes

  def rows(length: int, block: bool, which: int | None = None):
    """A head's `length` rows for grid (b, n, block index), the block's or all: of q, k or v
    (`which`: its index in the fused array), or of the output and its gradient."""
    at = (lambda k: k) if block else (lambda k: 0)
    if not cfg.fused:
      return pl.BlockSpec((sq, sq, length, h), lambda i, j, k: (i, j, at(k), 0))
    if which is None:
      return pl.BlockSpec((sq, length, sq, h), lambda i, j, k: (i, at(k), j, 0))
    return pl.BlockSpec((sq, length, sq, sq, h), lambda i, j, k: (i, at(k), which, j, 0))

  # A head's bias [H] of q or v in the fused [3,N,H] biases (see `_reading_biases`).
  bias = lambda which: pl.BlockSpec((sq, sq, h), lambda i, j, k: (which, j, 0))
  biases = [bias(QUERIES), bias(VALUES)]
  if blocked == "q":
    bq = cfg.block_q
    return dict(biases=biases, q=rows(bq, True, QUERIES), k=rows(s, False, KEYS),
                v=rows(s, False, VALUES), out=rows(bq, True),
                q_ids=pl.BlockSpec((sq, bq, lanes), lambda i, j, k: (i, k, 0)),
                kv_ids=pl.BlockSpec((sq, sub, s), lambda i, j, k: (i, 0, 0)),
                stats=pl.BlockSpec((sq, sq, bq, lanes), lambda i, j, k: (i, j, k, 0)),
                bits=pl.BlockSpec((sq, sq, bq // kernel_dropout.per_word(cfg), s),
                                  lambda i, j, k: (i, j, k, 0)))
  bk, quarters = cfg.block_k, kernel_dropout.groups(cfg, s)
  assert (KEYS, VALUES) == (0, 1)  # block 0 of two along the fused axis
  dkv = ([pl.BlockSpec((sq, quarters, bk, 2, sq, h), lambda i, j, k: (i, 0, k, 0, j, 0))]
         if cfg.fused else
         [pl.BlockSpec((sq, sq, quarters, bk, h), lambda i, j, k: (i, j, 0, k, 0))] * 2)
  return dict(biases=biases, q=rows(t, False, QUERIES), k=rows(s, False, KEYS),
              v=rows(s, False, VALUES), out=rows(t, False), dkv=dkv,
              q_ids=pl.BlockSpec((sq, sub, t), lambda i, j, k: (i, 0, 0)),
              kv_ids=pl.BlockSpec((sq, s, lanes), lambda i, j, k: (i, 0, 0)),
              stats=pl.BlockSpec((sq, sq, sub, t), lambda i, j, k: (i, j, 0, 0)),
              bits=pl.BlockSpec((sq, sq, t // kernel_dropout.per_word(cfg), s),
                                lambda i, j, k: (i, j, 0, 0)))


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg: Config, matmuls: int, dims,
          *args, aliases=None):
  """The pallas_call of one kernel. Its cost (`matmuls` products of 2·B·N·T·S·H FLOPs, one exp
  per score; dims = (B, N, T, S, H)) is declared, so XLA's FLOP count (`bert-jax plan`)
  includes what it computes. The fused array, passed as q, k and v, is counted once."""
  b, n, t, s, h = dims
  distinct = {id(x): x for x in args}.values()
  cost = pl.CostEstimate(
      flops=matmuls * 2 * b * n * t * s * h, transcendentals=b * n * t * s,
      bytes_accessed=sum(x.size * x.dtype.itemsize for x in distinct)
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
      # 8 warps: the registers of the dK/dV kernel's accumulators spread over 256 threads
      params = dict(compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=2))
  return pl.pallas_call(kernel, grid=grid, in_specs=[words_spec, *in_specs],
                        out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret,
                        cost_estimate=cost, input_output_aliases=aliases or {},
                        **params)(*args)


def _column_tile(ids, lanes: int):
  """[B,L] ids (or [B,N,L] statistics) as [..., L, lanes]: one per row of a block."""
  return jnp.broadcast_to(ids[..., None], ids.shape + (lanes,))


def _row_tile(ids, sublanes: int):
  """[B,L] ids (or [B,N,L] statistics) as [..., sublanes, L]: one per column of a block."""
  return jnp.broadcast_to(ids[..., None, :], ids.shape[:-1] + (sublanes, ids.shape[-1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def flash(qkv, bias, q_seg, kv_seg, words, cfg: Config):
  """Attention of the queries over the keys and values `qkv` (one [B,T,3,N,H] array where
  cfg.fused, plus its `bias` [3,N,H] or None; else q [B,N,T,H], k and v [B,N,S,H], bias None)
  as the segment ids [B,T], [B,S] allow, with the probabilities dropped at cfg.rate by the
  words [key0, key1, first row, first head]: [B,T,N,H] where cfg.fused, else [B,N,T,H]."""
  return _flash_fwd(qkv, bias, q_seg, kv_seg, words, cfg)[0]


def _kernel_and_inputs(kernel, qkv, bias, cfg: Config, specs: dict):
  """The kernel, and the specs and operands of its first inputs after the words: q, k and v,
  then, where a bias is given, the queries' and values' biases (see `_reading_biases`)."""
  in_specs = [specs["q"], specs["k"], specs["v"]]
  if bias is None:
    return kernel, in_specs, _operands(qkv, cfg)
  assert cfg.fused, "a bias is added in the kernel to the fused projection only"
  return _reading_biases(kernel), in_specs + specs["biases"], _operands(qkv, cfg) + [bias] * 2


def _flash_fwd(qkv, bias, q_seg, kv_seg, words, cfg: Config):
  dims = b, n, t, s, h = _dims(qkv, cfg)
  kernel, in_specs, operands = _kernel_and_inputs(
      functools.partial(_fwd_kernel, cfg=cfg, seq_q=t, seq_k=s), qkv, bias, cfg,
      sp := _specs(t, s, h, cfg, "q"))
  row = jax.ShapeDtypeStruct((b, n, t, cfg.lanes), jnp.float32)
  dtype = jax.tree.leaves(qkv)[0].dtype
  packed = kernel_dropout.packs_keep(cfg)
  words_shape = (b, n, t // kernel_dropout.per_word(cfg), s)
  out, m, l, *bits = _call(
      kernel, (b, n, t // cfg.block_q), in_specs + [sp["q_ids"], sp["kv_ids"]],
      [sp["out"], sp["stats"], sp["stats"]] + [sp["bits"]] * packed,
      [jax.ShapeDtypeStruct((b, t, n, h) if cfg.fused else (b, n, t, h), dtype), row, row]
      + [jax.ShapeDtypeStruct(words_shape, jnp.int32)] * packed, cfg, 2,
      dims, words, *operands, _column_tile(q_seg, cfg.lanes), _row_tile(kv_seg, cfg.sublanes))
  # Only the first lane of the statistics is kept for the backward pass.
  return out, (qkv, bias, q_seg, kv_seg, words, out, m[..., 0], l[..., 0], bits)


def _flash_bwd(cfg: Config, residuals, d_out):
  qkv, bias, q_seg, kv_seg, words, out, m, l, bits = residuals
  dims = b, n, t, s, h = _dims(qkv, cfg)
  dtype = out.dtype
  d_out = d_out.astype(dtype)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  delta = jnp.swapaxes(delta, 1, 2) if cfg.fused else delta  # [B,N,T] as m and l
  quarters = kernel_dropout.groups(cfg, s)
  by_quarter = ((b, quarters, s // quarters, 3, n, h) if cfg.fused
                else (b, n, quarters, s // quarters, h))
  kernel, in_specs, operands = _kernel_and_inputs(
      functools.partial(_dkv_kernel, cfg=cfg, seq_q=t, seq_k=s), qkv, bias, cfg,
      sk := _specs(t, s, h, cfg, "k"))
  dkv = _call(kernel, (b, n, s // (cfg.block_k * quarters)),
              in_specs + [sk["q_ids"], sk["kv_ids"], sk["out"]] + [sk["stats"]] * 3
              + [sk["bits"]] * len(bits), sk["dkv"],
              [jax.ShapeDtypeStruct(by_quarter, dtype)] * len(sk["dkv"]),
              cfg, 4,  # q·k again, dv, dp, dk
              dims, words, *operands, _row_tile(q_seg, cfg.sublanes),
              _column_tile(kv_seg, cfg.lanes), d_out,
              *[_row_tile(x, cfg.sublanes) for x in (m, l, delta)], *bits)
  kernel, in_specs, operands = _kernel_and_inputs(
      functools.partial(_dq_kernel, cfg=cfg, seq_q=t, seq_k=s), qkv, bias, cfg,
      sq := _specs(t, s, h, cfg, "q"))
  in_specs += [sq["q_ids"], sq["kv_ids"], sq["out"]] + [sq["stats"]] * 3 + [sq["bits"]] * len(bits)
  args = [words, *operands, _column_tile(q_seg, cfg.lanes), _row_tile(kv_seg, cfg.sublanes),
          d_out, *[_column_tile(x, cfg.lanes) for x in (m, l, delta)], *bits]
  if not cfg.fused:
    dq = _call(kernel, (b, n, t // cfg.block_q), in_specs, sq["q"],
               jax.ShapeDtypeStruct(qkv[0].shape, dtype), cfg, 3, dims, *args)
    return (dq, *(x.reshape(k.shape) for x, k in zip(dkv, qkv[1:]))), None, None, None, None
  # dQ into the dK/dV kernel's buffer, in place: the whole fused gradient
  d_qkv = _call(kernel, (b, n, t // cfg.block_q), in_specs + [sq["q"]], sq["q"],
                jax.ShapeDtypeStruct(qkv.shape, dtype), cfg, 3, dims, *args,
                dkv[0].reshape(qkv.shape), aliases={len(args): 0})  # q·k, dp, dq
  d_bias = (None if bias is None
            else jnp.sum(d_qkv, axis=(0, 1), dtype=jnp.float32).astype(bias.dtype))
  return d_qkv, d_bias, None, None, None


flash.defvjp(_flash_fwd, _flash_bwd)
