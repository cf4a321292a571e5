"""The record format: round trips, the vectorised encoder equals the per-record one."""

from __future__ import annotations

import numpy as np
import pytest

from bert_jax.data import records
from bert_jax.errors import UserError


@pytest.mark.parametrize("wide", [False, True])
def test_round_trip(wide):
  top = 100_000 if wide else 30_000
  ids = np.array([2, 7, top - 1, 3, 9, 11, 3])
  cont = np.array([0, 0, 1, 0, 0, 1, 0], bool)
  data = records.encode_record(ids, 2, np.array([1, 5]), np.array([top - 2, 8]), 1, cont, wide)
  got = records.decode_record(data)
  np.testing.assert_array_equal(got["input_ids"], ids)
  np.testing.assert_array_equal(got["segment_ids"], [0, 0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(got["masked_lm_positions"], [1, 5])
  np.testing.assert_array_equal(got["masked_lm_ids"], [top - 2, 8])
  np.testing.assert_array_equal(got["continuation"], cont)
  assert got["next_sentence_label"] == 1 and all(
      v.dtype == np.int32 for k, v in got.items() if k != "continuation")


def test_batch_encoder_matches_single():
  rng = np.random.default_rng(0)
  N, L, P = 200, 40, 6
  ids = rng.integers(0, 30000, (N, L))
  lengths = rng.integers(6, L + 1, N)
  len_a = np.array([rng.integers(1, n - 3) for n in lengths])
  pos, lab = rng.integers(0, L, (N, P)), rng.integers(0, 30000, (N, P))
  counts, rnd = rng.integers(0, P + 1, N), rng.integers(0, 2, N)
  batch = records.encode_records(ids, lengths, len_a, pos, lab, counts, rnd)
  single = [records.encode_record(ids[n, :lengths[n]], len_a[n], pos[n, :counts[n]],
                                  lab[n, :counts[n]], rnd[n], None, False) for n in range(N)]
  assert batch == single


def test_unknown_version_is_a_user_error():
  data = bytearray(records.encode_record(np.array([2, 5, 3, 6, 3]), 1, np.zeros(0), np.zeros(0),
                                         0, None, False))
  data[0] = 9
  with pytest.raises(UserError, match="version 9"):
    records.decode_record(bytes(data))
