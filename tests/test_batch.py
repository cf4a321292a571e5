"""The batch schema (bert_jax.data.batch): what a pretraining batch holds, decode_batch's bytes
against records built by hand from the documented record layout, masking's fields under the
batch's names, the abstract batch, and the micro-batch join/split pair."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from bert_jax.data import batch, masking, records


def test_the_pretraining_schema():
  assert [(f.name, np.dtype(f.dtype).name, f.dims) for f in batch.PRETRAINING] == [
      ("input_ids", "int32", ("B", "T")), ("attention_mask", "int32", ("B", "T")),
      ("token_type_ids", "int32", ("B", "T")), ("masked_lm_positions", "int32", ("B", "P")),
      ("masked_lm_ids", "int32", ("B", "P")), ("masked_lm_weights", "float32", ("B", "P")),
      ("next_sentence_label", "int32", ("B",))]
  assert batch.shapes(batch.PRETRAINING, **batch.pretraining_sizes(4, 16, 3)) == dict(
      input_ids=(4, 16), attention_mask=(4, 16), token_type_ids=(4, 16),
      masked_lm_positions=(4, 3), masked_lm_ids=(4, 3), masked_lm_weights=(4, 3),
      next_sentence_label=(4,))
  with pytest.raises(ValueError, match="segment_ids"):
    batch.pretraining_batch(dict(batch.pretraining_batch(_expected()), segment_ids=np.zeros(3)))


def _record(flags: int, len_a: int, len_b: int, ids, wide: bool, positions, labels,
            continuation_bytes: bytes = b"") -> bytes:
  """A record from records.py's documented layout (header <BBHHH, ids, positions, labels,
  packed continuation bits), written without encode_record."""
  id_fmt = "<%di" if wide else "<%dH"
  return (struct.pack("<BBHHH", 1, flags, len_a, len_b, len(positions))
          + struct.pack(id_fmt % len(ids), *ids) + struct.pack("<%dH" % len(positions), *positions)
          + struct.pack(id_fmt % len(labels), *labels) + continuation_bytes)


FIXED_RECORDS = [
    # A pair, 16-bit ids, B a random next segment, two predictions.
    _record(2, 2, 1, [101, 7, 8, 102, 9, 102], False, [1, 4], [70, 90]),
    # One segment, 32-bit ids, continuation bits 0b00100 (token 2 continues a word).
    _record(1 | 4 | 8, 3, 0, [101, 70000, 5, 6, 102], True, [2], [70001], bytes([0x20])),
    # A pair without predictions.
    _record(0, 1, 2, [101, 5, 102, 6, 7, 102], False, [], []),
]


def _expected() -> dict[str, np.ndarray]:
  i32 = lambda rows: np.array(rows, np.int32)  # noqa: E731
  return dict(
      input_ids=i32([[101, 7, 8, 102, 9, 102, 0, 0], [101, 70000, 5, 6, 102, 0, 0, 0],
                     [101, 5, 102, 6, 7, 102, 0, 0]]),
      token_type_ids=i32([[0, 0, 0, 0, 1, 1, 0, 0], [0] * 8, [0, 0, 0, 1, 1, 1, 0, 0]]),
      attention_mask=i32([[1] * 6 + [0] * 2, [1] * 5 + [0] * 3, [1] * 6 + [0] * 2]),
      masked_lm_positions=i32([[1, 4, 0], [2, 0, 0], [0, 0, 0]]),
      masked_lm_ids=i32([[70, 90, 0], [70001, 0, 0], [0, 0, 0]]),
      masked_lm_weights=np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32),
      next_sentence_label=i32([1, 0, 0]))


def test_decode_batch_gives_the_stored_bytes_under_the_schema():
  got, len_a, continuation = records.decode_batch(FIXED_RECORDS, seq_len=8, max_predictions=3)
  want = _expected()
  assert list(got) == list(batch.PRETRAINING_NAMES)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k
  np.testing.assert_array_equal(len_a, [2, 3, 1])
  want_continuation = np.zeros((3, 8), bool)
  want_continuation[1, 2] = True
  np.testing.assert_array_equal(continuation, want_continuation)
  # read_instances' documented contract keeps the record's name for token_type_ids.
  one = records.decode_record(FIXED_RECORDS[0])
  np.testing.assert_array_equal(one["segment_ids"], want["token_type_ids"][0, :6])


def test_masking_sets_the_batch_fields_under_their_names():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 100, (4, 12)).astype(np.int32)
  maskable = np.ones((4, 12), bool)
  maskable[:, 0] = False
  m = masking.mask_tokens(rng, ids, maskable, None, masked_lm_prob=0.3, max_predictions=5,
                          mask_id=4, random_pool=np.arange(5, 100, dtype=np.int32))
  fields = m.batch_fields()
  assert set(fields) <= set(batch.PRETRAINING_NAMES)
  dtypes = {f.name: np.dtype(f.dtype) for f in batch.PRETRAINING}
  assert all(v.dtype == dtypes[k] for k, v in fields.items())
  np.testing.assert_array_equal(fields["masked_lm_weights"].sum(1), m.num_predictions)
  assert fields["masked_lm_weights"].shape == (4, 5)


def test_the_abstract_batch_is_the_schema_split_over_the_batch_axes():
  import jax

  from bert_jax.training import sharding
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  abstract = batch.abstract_batch(sharding.batch_sharding(mesh), 4, 16, 3)
  host = batch.pretraining_batch({k: np.zeros(s.shape, s.dtype) for k, s in abstract.items()})
  assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {
      k: (v.shape, v.dtype) for k, v in host.items()}
  assert all(v.sharding == sharding.batch_sharding(mesh) for v in abstract.values())


def test_a_steps_micro_batches_join_as_the_train_step_splits_them():
  """join_micro lays a step's micro-batches out (padded to one length, interleaved) exactly
  as the train step's accumulation takes them apart again: micro-batch i comes back."""
  import jax.numpy as jnp

  from bert_jax.finetune.featurize import IGNORE
  from bert_jax.training import steps
  assert batch.FINETUNING_FILL["labels"] == IGNORE
  rng = np.random.default_rng(0)
  micros = [{"input_ids": rng.integers(1, 99, (4, length)).astype(np.int32),
             "labels": rng.integers(0, 3, (4, length)).astype(np.int32),
             "weight": np.ones(4, np.float32) * i} for i, length in enumerate((8, 16, 8))]
  joined = batch.join_micro(micros, seq_keys=("input_ids", "labels"))
  assert joined["input_ids"].shape == (12, 16)
  split = steps._micro_batches({k: jnp.asarray(v) for k, v in joined.items()}, 3)
  for k, fill in (("input_ids", 0), ("labels", IGNORE)):
    np.testing.assert_array_equal(batch.split_micro(joined[k], 3), split[k])
    for i, m in enumerate(micros):
      n = m[k].shape[-1]
      np.testing.assert_array_equal(split[k][i][:, :n], m[k])
      assert (np.asarray(split[k][i][:, n:]) == fill).all()
  np.testing.assert_array_equal(split["weight"], [[0] * 4, [1] * 4, [2] * 4])
