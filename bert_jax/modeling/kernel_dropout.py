"""Attention dropout inside the flash kernel (`flash.py`): the bits `dropout.keep_mask` draws
for the [B,N,T,S] probabilities, hashed per block from each element's global (b, n, t, s), one
Threefry for the four key blocks that share a counter (`groups`); and the forward kernel's bits
packed into int32 words for the backward kernels (`packs_keep`), which read them back instead of
hashing again. `cfg` is the kernel's `flash.Config`."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from bert_jax.modeling import dropout


class Where(NamedTuple):
  """The global row and head of a kernel instance (read once, at the kernel's top level)."""
  b: jax.Array
  n: jax.Array


def where(words_ref) -> Where:
  return Where(pl.program_id(0).astype(jnp.uint32) + words_ref[2],
               pl.program_id(1).astype(jnp.uint32) + words_ref[3])


def groups(cfg, seq_k: int) -> int:
  """How many key blocks draw their dropout bits from the same hashes: 4 where a block fits in
  a quarter of the keys (C = S/4; keep_mask's counter of key s is s mod C and its 16-bit word
  s // C, so the blocks at one offset in the four quarters share their counters, and one
  Threefry gives all four masks, as in keep_mask), else 1 (a block spans quarters: one hash per
  element). The kernels visit key blocks as (j, g): block j of quarter g, at j*bk + g*S/4."""
  return 4 if cfg.block_k <= seq_k // 4 else 1


def keeps(words_ref, at: Where, cfg, seq_q: int, seq_k: int, t0, j, shape,
          keys_first: bool = False) -> list:
  """The kept elements of the groups(...) [bq, bk] blocks ([bk, bq] keys first) at queries t0
  and key-block index j (None for each where nothing is dropped): the bits keep_mask draws for
  [B, N, T, S] (counter (n*T + t)*C + s mod C under row b, 16-bit word s // C; C = S/4, a
  power of two, so both are a mask and a shift)."""
  if cfg.rate <= 0.0:
    return [None] * groups(cfg, seq_k)
  b, n = at
  c = seq_k // 4
  t_axis, s_axis = (1, 0) if keys_first else (0, 1)
  t = (t0 + jax.lax.broadcasted_iota(jnp.int32, shape, t_axis)).astype(jnp.uint32)
  s = j * cfg.block_k + jax.lax.broadcasted_iota(jnp.int32, shape, s_axis)
  within = (n * np.uint32(seq_q) + t) * np.uint32(c) + (s & (c - 1)).astype(jnp.uint32)
  hi, lo = dropout.threefry2x32(words_ref[0], words_ref[1], within,
                                jnp.broadcast_to(b, shape))
  words = (hi >> 16, hi & 0xFFFF, lo >> 16, lo & 0xFFFF)
  if groups(cfg, seq_k) == 4:
    bits = list(words)
  else:
    word = s >> (c.bit_length() - 1)
    bits = [jnp.where(word == 0, words[0], jnp.where(word == 1, words[1],
                      jnp.where(word == 2, words[2], words[3])))]
  return [x.astype(jnp.int32) < cfg.threshold for x in bits]


def block_start(cfg, seq_k: int, j, g):
  """The first key of block j of quarter g (see `groups`)."""
  return pl.multiple_of(j * cfg.block_k + g * (seq_k // groups(cfg, seq_k)), cfg.block_k)


def per_word(cfg) -> int:
  """Queries whose keep bits share an int32 word: 32, or 16 in TPU tiles, so that a 128-query
  block's words are one 8-row tile."""
  return 32 if cfg.sublanes == 1 else 16


def packs_keep(cfg) -> bool:
  """Whether the forward kernel writes its keep bits for the backward kernels ([B,N,T/w,S]
  int32, w = `per_word` queries to a word: 1 or 2 bits per element) instead of their hashing
  them again: two thirds of the hashing, which bounds the kernels (Threefry's integer work
  outweighs their matrix work)."""
  return cfg.rate > 0.0 and cfg.block_q % (per_word(cfg) * cfg.sublanes) == 0


def pack(keep, w: int):
  """[bq, bk] kept elements -> [bq/w, bk] int32 words: bit r of word v is query w*v + r."""
  bq, bk = keep.shape
  bits = keep.astype(jnp.int32).reshape(bq // w, w, bk)
  return jnp.sum(bits << jax.lax.broadcasted_iota(jnp.int32, bits.shape, 1), axis=1)


def unpack(words, w: int, keys_first: bool):
  """[bq/w, bk] words -> the [bq, bk] kept elements, or [bk, bq] keys first."""
  rows, cols = words.shape
  spread = jnp.broadcast_to(words[:, None, :], (rows, w, cols)).reshape(
      rows * w, cols)
  bits = (spread >> (jax.lax.broadcasted_iota(jnp.int32, spread.shape, 0) & (w - 1))) & 1
  return (bits.T if keys_first else bits) != 0


def backward_keeps(words_ref, bits_ref, at: Where, cfg, seq_q: int, seq_k: int, i,
                   j, keys_first: bool) -> list:
  """The backward kernels' kept elements of the groups(...) blocks at query block i and key
  block index j: read from the forward's bits where it left them (bits_ref, see packs_keep:
  all the words of the queries keys first, else the query block's own), else hashed again."""
  bq, w = cfg.block_q, per_word(cfg)
  if not bits_ref:
    shape = (cfg.block_k, bq) if keys_first else (bq, cfg.block_k)
    return keeps(words_ref, at, cfg, seq_q, seq_k, i * bq, j, shape, keys_first)
  words = (pl.ds(pl.multiple_of(i * (bq // w), bq // w), bq // w)
           if keys_first else slice(None))
  return [unpack(bits_ref[0][words, pl.ds(block_start(cfg, seq_k, j, g), cfg.block_k)],
                 w, keys_first) for g in range(groups(cfg, seq_k))]
