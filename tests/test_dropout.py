"""Dropout keep masks (bert_jax.modeling.dropout): jax's Threefry, the keep rate, independence, layout."""

from __future__ import annotations

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax.modeling import dropout


def test_threefry_matches_jax_threefry_2x32():
  rng = np.random.default_rng(0)
  for _ in range(3):
    key = rng.integers(0, 2**32, size=2, dtype=np.uint32)
    x0, x1 = rng.integers(0, 2**32, size=(2, 257), dtype=np.uint32)
    ours = dropout.threefry2x32(jnp.uint32(key[0]), jnp.uint32(key[1]), jnp.asarray(x0),
                                jnp.asarray(x1))
    theirs = jex.random.threefry_2x32(jnp.asarray(key), jnp.concatenate([x0, x1]))
    np.testing.assert_array_equal(np.concatenate(ours), np.asarray(theirs))


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_rate_and_scale_per_column(rate):
  """Every column (each of the four 16-bit slots, and the cut-off tail) keeps at the rate."""
  shape = (64, 96, 7)  # last axis not a multiple of 4
  keep, scale = jax.jit(dropout.keep_mask, static_argnums=(1, 2))(
      jax.random.key(0), shape, rate)
  keep = np.asarray(keep)
  assert keep.shape == shape and keep.dtype == bool
  p = round((1 - rate) * 65536) / 65536
  assert abs(p - (1 - rate)) < 1e-5 and scale == pytest.approx(1 / p, rel=1e-12)
  rows = shape[0] * shape[1]
  sigma = np.sqrt(p * (1 - p) / rows)
  np.testing.assert_array_less(np.abs(keep.reshape(rows, -1).mean(0) - p), 5 * sigma)
  assert abs(keep.mean() - p) < 5 * np.sqrt(p * (1 - p) / keep.size)


def test_masks_are_independent_across_slots_rows_and_keys():
  rate = 0.5
  key = jax.random.key(1)
  keep = np.asarray(dropout.keep_mask(key, (32, 4, 64), rate)[0]).reshape(-1, 64)
  slots = np.split(keep, 4, axis=-1)  # the four 16-bit uniforms of one hash output
  for i in range(4):
    for j in range(i + 1, 4):
      agreement = (slots[i] == slots[j]).mean()
      assert abs(agreement - 0.5) < 0.03, (i, j, agreement)
  assert abs((keep[:-1] == keep[1:]).mean() - 0.5) < 0.03  # neighbouring rows
  again = np.asarray(dropout.keep_mask(key, (32, 4, 64), rate)[0]).reshape(-1, 64)
  other = np.asarray(dropout.keep_mask(jax.random.key(2), (32, 4, 64), rate)[0]).reshape(-1, 64)
  np.testing.assert_array_equal(keep, again)
  assert abs((keep == other).mean() - 0.5) < 0.03


def test_a_one_axis_shape_is_the_single_row_of_its_two_axis_form():
  key = jax.random.key(3)
  flat, scale = dropout.keep_mask(key, (50,), 0.1)
  row, row_scale = dropout.keep_mask(key, (1, 50), 0.1)
  np.testing.assert_array_equal(np.asarray(flat), np.asarray(row)[0])
  assert scale == row_scale


def test_the_mask_of_a_leading_slice_does_not_depend_on_the_batch_size():
  """Counters are element indices, so row b's mask is the same in a batch of 2 or of 8."""
  key = jax.random.key(4)
  small = np.asarray(dropout.keep_mask(key, (2, 16, 12), 0.1)[0])
  large = np.asarray(dropout.keep_mask(key, (8, 16, 12), 0.1)[0])
  np.testing.assert_array_equal(small, large[:2])
