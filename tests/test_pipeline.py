"""The grain pipeline: fixed shapes, contents, sharding, exact resume, dynamic masking."""

from __future__ import annotations

import numpy as np
import pytest

from bert_jax.data import create, pipeline, read_instances
from bert_jax.errors import UserError

SEQ, PRED = 64, 10


@pytest.fixture(scope="module")
def vocab(minilm_dir):
  return str(minilm_dir / "vocab.txt")


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory, vocab):
  out = tmp_path_factory.mktemp("pipe") / "static"
  create.create_data(["sample"], vocab, out, max_seq_length=SEQ, max_predictions_per_seq=PRED,
                     dupe_factor=1, workers=1, progress=False)
  return out


@pytest.fixture(scope="module")
def dynamic_dir(tmp_path_factory, vocab):
  out = tmp_path_factory.mktemp("pipe") / "dynamic"
  create.create_data(["sample"], vocab, out, max_seq_length=SEQ, max_predictions_per_seq=PRED,
                     dupe_factor=1, workers=1, progress=False, static_masking=False,
                     whole_word_mask=True)
  return out


def _iter(data_dir, **kw):
  args = dict(batch_size=8, seq_len=SEQ, max_predictions=PRED, seed=0, process_index=0,
              process_count=1)
  args.update(kw)
  return pipeline.make_iterator(data_dir, **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_shapes_and_contents_match_the_records(static_dir):
  insts = list(read_instances(static_dir))
  it = _iter(static_dir, shuffle=False, num_epochs=1)
  batch = next(it)
  shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
  assert shapes == {
      "input_ids": ((8, SEQ), np.int32), "input_mask": ((8, SEQ), np.int32),
      "segment_ids": ((8, SEQ), np.int32), "masked_lm_positions": ((8, PRED), np.int32),
      "masked_lm_ids": ((8, PRED), np.int32), "masked_lm_weights": ((8, PRED), np.float32),
      "next_sentence_labels": ((8,), np.int32)}
  for row, inst in enumerate(insts[:8]):
    n, k = len(inst["input_ids"]), len(inst["masked_lm_ids"])
    np.testing.assert_array_equal(batch["input_ids"][row, :n], inst["input_ids"])
    assert not batch["input_ids"][row, n:].any() and batch["input_mask"][row].sum() == n
    np.testing.assert_array_equal(batch["segment_ids"][row, :n], inst["segment_ids"])
    np.testing.assert_array_equal(batch["masked_lm_positions"][row, :k], inst["masked_lm_positions"])
    np.testing.assert_array_equal(batch["masked_lm_ids"][row, :k], inst["masked_lm_ids"])
    assert batch["masked_lm_weights"][row].tolist() == [1.0] * k + [0.0] * (PRED - k)
    assert batch["next_sentence_labels"][row] == inst["next_sentence_label"]


def test_one_epoch_visits_every_record_once_and_shuffle_differs(static_dir):
  num = len(list(read_instances(static_dir)))
  seen = np.concatenate([b["input_ids"] for b in _iter(static_dir, num_epochs=1, batch_size=1)])
  assert len(seen) == num and len({r.tobytes() for r in seen}) == len(seen)
  plain = next(_iter(static_dir, shuffle=False))["input_ids"]
  shuffled = next(_iter(static_dir, shuffle=True))["input_ids"]
  assert not np.array_equal(plain, shuffled)


def test_process_sharding_splits_the_records(static_dir):
  rows = []
  for index in range(2):
    it = _iter(static_dir, num_epochs=1, batch_size=1, process_index=index, process_count=2)
    rows.append({b["input_ids"].tobytes() for b in it})
  total = len(list(read_instances(static_dir)))
  assert not rows[0] & rows[1] and len(rows[0]) + len(rows[1]) == total - total % 2


@pytest.mark.parametrize("where", ["mid-epoch", "epoch boundary"])
def test_state_round_trip_gives_the_next_batches(static_dir, where):
  # 8 records a batch: from the epoch's last batch, the next ones cross into epoch 2.
  records = pipeline.manifest(static_dir)["splits"]["train"]["num_instances"]
  skip = 3 if where == "mid-epoch" else records // 8 - 1
  it = _iter(static_dir)
  _take(it, skip)
  state = it.get_state()
  expected = _take(it, 4)
  fresh = _iter(static_dir)
  fresh.set_state(state)
  _assert_same(_take(fresh, 4), expected)


def test_dynamic_masking_fresh_per_epoch_reproducible_and_resumable(dynamic_dir, vocab):
  man = pipeline.manifest(dynamic_dir)
  assert man["static_masking"] is False and man["whole_word_mask"] is True
  records = man["splits"]["train"]["num_instances"]
  epoch = records // 8
  it = _iter(dynamic_dir, shuffle=False)
  first, second = _take(it, epoch), _take(it, 3)
  # Records 0-7 again in epoch 2 (rows `records`..+7 of the stream), new masks, the same text.
  def stream(batches, key):
    return np.concatenate([b[key] for b in batches])

  def restored(batches):
    ids = stream(batches, "input_ids").copy()
    positions, labels = stream(batches, "masked_lm_positions"), stream(batches, "masked_lm_ids")
    for row, k in enumerate(stream(batches, "masked_lm_weights").sum(-1).astype(int)):
      ids[row, positions[row, :k]] = labels[row, :k]
    return ids

  again = slice(records, records + 8)
  assert not np.array_equal(stream(first, "masked_lm_positions")[:8],
                            stream(first + second, "masked_lm_positions")[again])
  np.testing.assert_array_equal(restored(first)[:8], restored(first + second)[again])
  masked_fraction = np.mean([b["masked_lm_weights"].sum() / (b["input_mask"].sum() - 3 * 8)
                             for b in first])
  assert 0.12 < masked_fraction < 0.17
  assert (np.concatenate([b["input_ids"] for b in first]) == man["vocab"]["mask_id"]).any()
  # The same seed reproduces the masks; state round trip across the epoch boundary too.
  _assert_same(_take(_iter(dynamic_dir, shuffle=False), 3), first[:3])
  it = _iter(dynamic_dir)
  _take(it, epoch - 1)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = _iter(dynamic_dir)
  fresh.set_state(state)
  _assert_same(_take(fresh, 3), expected)


def test_manifest_and_fit_errors(tmp_path, static_dir):
  with pytest.raises(UserError, match="not found"):
    pipeline.manifest(tmp_path / "nope")
  (tmp_path / "partial").mkdir()
  (tmp_path / "partial" / "train-00000.array_record.tmp").write_bytes(b"")
  with pytest.raises(UserError, match="partial.*incomplete"):
    pipeline.manifest(tmp_path / "partial")
  with pytest.raises(UserError, match="max-seq-length 64.*seq_len 32"):
    _iter(static_dir, seq_len=32)
  with pytest.raises(UserError, match="max_predictions 5"):
    _iter(static_dir, max_predictions=5)
  with pytest.raises(UserError, match="already masked"):
    _iter(static_dir, dynamic_masking=True)
  with pytest.raises(UserError, match="no split 'eval'"):
    _iter(static_dir, split="eval")
  # Longer phases take shorter data (padding), e.g. 128-token data in a 512 phase.
  assert next(_iter(static_dir, seq_len=128, max_predictions=20))["input_ids"].shape == (8, 128)


def test_dynamic_token_masking_budget(tmp_path, vocab):
  out = tmp_path / "plain"
  create.create_data(["sample"], vocab, out, max_seq_length=SEQ, dupe_factor=1, workers=1,
                     progress=False, static_masking=False)
  assert "continuation" not in next(read_instances(out))
  for batch in _take(_iter(out, shuffle=False), 5):
    maskable = batch["input_mask"].sum(1) - 3
    expected = np.clip(np.floor(maskable * 0.15 + 0.5), 1, PRED)
    np.testing.assert_array_equal(batch["masked_lm_weights"].sum(1), expected)
    labels = batch["masked_lm_ids"][batch["masked_lm_weights"] > 0]
    assert not np.isin(labels, [0, 101, 102]).any()     # never [PAD]/[CLS]/[SEP]
