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


def _random_records(rng, n, wide, continuation):
  top = 100_000 if wide else 30_000
  out = []
  for _ in range(n):
    length = int(rng.integers(5, 40))
    len_a = int(rng.integers(1, length - 3))
    k = int(rng.integers(0, min(7, length)))
    cont = rng.random(length) < 0.3 if continuation else None
    out.append(records.encode_record(rng.integers(0, top, length), len_a,
                                     np.sort(rng.choice(length, k, replace=False)),
                                     rng.integers(0, top, k), int(rng.integers(0, 2)), cont,
                                     wide))
  return out


@pytest.mark.parametrize("wide,continuation", [(False, False), (True, False), (False, True),
                                               (True, True)])
def test_batch_decoder_matches_single(wide, continuation):
  rng = np.random.default_rng(1)
  data = _random_records(rng, 50, wide, continuation)
  L, P = 48, 8
  batch, len_a, cont = records.decode_batch(data, L, P, pad_id=7)
  assert (cont is None) == (not continuation)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "input_ids": ((50, L), np.int32), "attention_mask": ((50, L), np.int32),
      "token_type_ids": ((50, L), np.int32), "masked_lm_positions": ((50, P), np.int32),
      "masked_lm_ids": ((50, P), np.int32), "masked_lm_weights": ((50, P), np.float32),
      "next_sentence_label": ((50,), np.int32)}
  for row, record in enumerate(data):
    one = records.decode_record(record)
    n, k = len(one["input_ids"]), len(one["masked_lm_ids"])
    assert len_a[row] == np.argmax(one["segment_ids"]) - 2
    np.testing.assert_array_equal(batch["input_ids"][row], np.pad(one["input_ids"], (0, L - n),
                                                                  constant_values=7))
    np.testing.assert_array_equal(batch["attention_mask"][row], np.arange(L) < n)
    np.testing.assert_array_equal(batch["token_type_ids"][row], np.pad(one["segment_ids"], (0, L - n)))
    np.testing.assert_array_equal(batch["masked_lm_positions"][row],
                                  np.pad(one["masked_lm_positions"], (0, P - k)))
    np.testing.assert_array_equal(batch["masked_lm_ids"][row],
                                  np.pad(one["masked_lm_ids"], (0, P - k)))
    np.testing.assert_array_equal(batch["masked_lm_weights"][row], np.arange(P) < k)
    assert batch["next_sentence_label"][row] == one["next_sentence_label"]
    if continuation:
      np.testing.assert_array_equal(cont[row], np.pad(one["continuation"], (0, L - n)))


def test_batch_decoder_errors():
  data = _random_records(np.random.default_rng(2), 3, False, False)
  with pytest.raises(UserError, match="more than the batch's 4 and 8"):
    records.decode_batch(data, 4, 8)
  with pytest.raises(UserError, match="does not match its header"):
    records.decode_batch([data[0], data[1][:-1]], 64, 8)
  bad = bytearray(data[2])
  bad[0] = 9
  with pytest.raises(UserError, match="version 9"):
    records.decode_batch([data[0], bytes(bad)], 64, 8)


def test_shard_reader_reads_keys_across_shards(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  paths = []
  for shard, count in enumerate((3, 5)):
    paths.append(str(tmp_path / f"s{shard}.array_record"))
    writer = ArrayRecordWriter(paths[-1], records.WRITER_OPTIONS)
    for i in range(count):
      writer.write(f"{shard}:{i}".encode())
    writer.close()
  reader = records.ShardReader(paths)
  assert len(reader) == 8
  assert reader.read(np.array([7, 0, 3, 2, 4])) == [b"1:4", b"0:0", b"1:0", b"0:2", b"1:1"]
  import pickle
  assert pickle.loads(pickle.dumps(reader)).read(np.array([5])) == [b"1:2"]


def test_pair_record_bytes_are_those_of_the_documented_layout():
  """Records written before single segments existed: header, u16 ids, positions, labels."""
  import struct
  data = records.encode_record(np.array([2, 5, 3, 6, 3]), 1, np.array([3]), np.array([9]), 1,
                               None, False)
  assert data == (struct.pack("<BBHHH", 1, records.FLAG_RANDOM_NEXT, 1, 1, 1)
                  + np.array([2, 5, 3, 6, 3, 3, 9], np.uint16).tobytes())


@pytest.mark.parametrize("wide", [False, True])
def test_single_segment_round_trip(wide):
  top = 100_000 if wide else 30_000
  ids = np.array([2, 7, top - 1, 3, 9, 11, 3])    # [CLS] a b [SEP] c d [SEP]: two documents
  cont = np.array([0, 0, 1, 0, 0, 1, 0], bool)
  data = records.encode_record(ids, 5, np.array([1, 5]), np.array([top - 2, 8]), 0, cont, wide,
                               single_segment=True)
  got = records.decode_record(data)
  np.testing.assert_array_equal(got["input_ids"], ids)
  np.testing.assert_array_equal(got["segment_ids"], np.zeros(7))
  np.testing.assert_array_equal(got["masked_lm_ids"], [top - 2, 8])
  np.testing.assert_array_equal(got["continuation"], cont)
  assert got["next_sentence_label"] == 0


def test_single_segment_batch_encoder_matches_single():
  rng = np.random.default_rng(3)
  N, L, P = 50, 40, 6
  ids, lengths = rng.integers(0, 30000, (N, L)), rng.integers(3, L + 1, N)
  pos, lab, counts = rng.integers(0, L, (N, P)), rng.integers(0, 30000, (N, P)), \
      rng.integers(0, P + 1, N)
  batch = records.encode_records(ids, lengths, lengths - 2, pos, lab, counts, np.zeros(N),
                                 single_segment=True)
  assert batch == [records.encode_record(ids[n, :lengths[n]], lengths[n] - 2, pos[n, :counts[n]],
                                         lab[n, :counts[n]], 0, None, False, True)
                   for n in range(N)]


def test_batch_decoder_reads_pairs_and_single_segments_together():
  rng = np.random.default_rng(4)
  pairs = _random_records(rng, 20, False, True)
  singles = [records.encode_record(rng.integers(0, 30000, n), n - 2, np.array([1]),
                                   np.array([5]), 0, rng.random(n) < 0.3, False, True)
             for n in rng.integers(3, 40, 20)]
  data = [x for pair in zip(pairs, singles) for x in pair]
  batch, len_a, cont = records.decode_batch(data, 48, 8)
  for row, record in enumerate(data):
    one = records.decode_record(record)
    n = len(one["input_ids"])
    np.testing.assert_array_equal(batch["input_ids"][row, :n], one["input_ids"])
    np.testing.assert_array_equal(batch["token_type_ids"][row, :n], one["segment_ids"])
    np.testing.assert_array_equal(cont[row, :n], one["continuation"])
    assert batch["attention_mask"][row].sum() == n
    if row % 2:
      assert len_a[row] == n - 2 and not batch["token_type_ids"][row].any()
