"""Dropout keep masks from a straight-line Threefry hash on iota counters.

`jax.random.bits` lowers Threefry-2x32 on CPU as a rolled five-iteration loop that writes two
whole uint32 arrays per iteration: memory-bound, ~3 ms per BERT-mini attention mask and ~64 ms
of kernel time per mini train step (partly overlapped with matmuls; ~9 ms here). Here the same
Threefry-2x32 block function (Salmon et al. 2011, 20 rounds; a test checks it against jax's) is
written out straight-line on iota counters: one kernel hashes each counter once, a second
turns the two output words into four 16-bit keep decisions. (On XLA CPU, fusing the hash into
each of the four compares computes it four times and compiles four large kernels per mask: ~70 MB
more peak memory for BERT-base from the compiler alone; the barrier against it is emitted only in
programs lowered for the CPU.)

Stateless and mesh-independent: the bits of an element depend only on the key and the
element's index in the global shape (iota shards like any other array).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x, r: int):
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(key0, key1, x0, x1):
  """Threefry-2x32 (20 rounds) of the counter pairs (x0, x1) under the key (key0, key1):
  uint32 arrays in, two uint32 arrays out."""
  ks = (key0, key1, key0 ^ key1 ^ _KEY_PARITY)
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, r) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def _counters(shape: tuple[int, ...]):
  """(index within the leading axis's row, index along the leading axis) for every element:
  unique while one row holds < 2**32 counters."""
  within = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(1, len(shape))):
    within = within + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    stride *= shape[axis]
  if stride >= 2**32:
    raise ValueError(f"dropout shape {shape}: {stride} counters per row exceed 2**32")
  return within, jax.lax.broadcasted_iota(jnp.uint32, shape, 0)


def keep_threshold(rate: float) -> int:
  """Kept when a 16-bit draw is below this: keep probability round((1 - rate) * 2**16) / 2**16."""
  return round((1.0 - rate) * 65536)


def key_words_of(key: jax.Array) -> jax.Array:
  """The two uint32 Threefry key words a dropout key stands for."""
  return jax.random.bits(key, (2,), jnp.uint32)


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> tuple[jax.Array, float]:
  """(boolean mask of the kept elements, the scale of kept values) for inverted dropout at
  `rate` (0 < rate < 1). The keep probability is round((1 - rate) * 2**16) / 2**16 (within 8e-6
  of 1 - rate) and the scale its exact inverse, so E[kept x scale] = x."""
  shape = tuple(shape)
  if len(shape) < 2:
    mask, scale = keep_mask(key, (1, math.prod(shape)), rate)
    return mask.reshape(shape), scale
  threshold = keep_threshold(rate)
  last = shape[-1]
  counter_shape = shape[:-1] + (-(-last // 4),)
  key_words = key_words_of(key)
  # Hash once per counter into two word arrays. On XLA CPU a barrier keeps the hash from being
  # fused into each of the four compares below (computed four times, four large kernels to
  # compile); other compilers fuse as they see fit. The bits are the same either way.
  a, b = jax.lax.platform_dependent(
      *threefry2x32(key_words[0], key_words[1], *_counters(counter_shape)),
      cpu=lambda a, b: jax.lax.optimization_barrier((a, b)), default=lambda a, b: (a, b))
  keep = jnp.concatenate([a >> 16 < threshold, (a & 0xFFFF) < threshold,
                          b >> 16 < threshold, (b & 0xFFFF) < threshold], axis=-1)
  return keep[..., :last], 65536.0 / threshold
