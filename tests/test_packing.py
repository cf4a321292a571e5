"""Packing several sequences into one row (finetune/packing.py, model.Packed): the rows hold
each sequence once, and every sequence's logits and the loss's gradients are the ones it gets
in a row of its own."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from bert_jax.config import BertConfig
from bert_jax.finetune import packing
from bert_jax.finetune.batching import make_batch
from bert_jax.finetune.evaluate import forward
from bert_jax.finetune.featurize import Features
from bert_jax.finetune.tasks import _masked_ce
from bert_jax.modeling import heads

CONFIG = BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=64,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
T = 16


def features(n, seed=0):
  """n sequence pairs of random lengths 3..T padded to T: [CLS]=1 first, types 1 after half."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, T + 1, n).astype(np.int32)
  lengths[0] = T
  real = np.arange(T) < lengths[:, None]
  ids = np.where(real, rng.integers(5, 99, (n, T)), 0).astype(np.int32)
  ids[:, 0] = 1
  types = (real & (np.arange(T) >= lengths[:, None] // 2)).astype(np.int32)
  arrays = {"input_ids": ids, "token_type_ids": types, "attention_mask": real.astype(np.int32),
            "labels": rng.integers(0, 3, n).astype(np.int32)}
  return Features(arrays, lengths)


def test_packed_rows_hold_each_sequence_once():
  feats = features(40)
  idx = np.arange(3, 40, 2)  # 19 sequences
  rows = packing.first_fit(feats.lengths[idx], T)[2]
  assert rows < len(idx)  # several share a row
  batch = packing.packed_batch(feats, idx, 24, rows, ("input_ids", "labels"))
  assert batch["input_ids"].shape == (rows, T) and batch["labels"].shape == (24,)
  covered = np.zeros((rows, T), bool)
  for j, i in enumerate(idx):
    r, s, n = batch["sequence_rows"][j], batch["sequence_starts"][j], feats.lengths[i]
    cut = slice(s, s + n)
    np.testing.assert_array_equal(batch["input_ids"][r, cut], feats.arrays["input_ids"][i, :n])
    np.testing.assert_array_equal(batch["token_type_ids"][r, cut],
                                  feats.arrays["token_type_ids"][i, :n])
    np.testing.assert_array_equal(batch["position_ids"][r, cut], np.arange(n))
    assert (batch["sequence_ids"][r, cut] == j + 1).all() and not covered[r, cut].any()
    covered[r, cut] = True
  assert (batch["sequence_ids"][~covered] == 0).all() and (batch["input_ids"][~covered] == 0).all()
  np.testing.assert_array_equal(batch["labels"][:19], feats.arrays["labels"][idx])
  np.testing.assert_array_equal(batch["weight"], np.arange(24) < 19)
  with pytest.raises(ValueError, match="need"):
    packing.packed_batch(feats, idx, 24, rows - 1, ())


def test_every_batch_fits_the_planned_rows():
  feats = features(300, seed=1)
  batches = packing.balanced_batches(feats.lengths, 32, np.random.default_rng(0))
  assert [len(b) for b in batches].count(32) == 9 and sorted(map(len, batches))[0] == 300 % 32
  np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(300))
  # Like mixes: the batches' token counts spread far less than random batches' do.
  tokens = [feats.lengths[b].sum() for b in batches if len(b) == 32]
  assert max(tokens) - min(tokens) < 0.1 * np.mean(tokens)
  (evened,), rows = packing.fit_rows([batches], feats.lengths, T, unit=4)
  assert rows % 4 == 0 and rows < 32
  assert [len(b) for b in evened] == [len(b) for b in batches]
  np.testing.assert_array_equal(np.sort(np.concatenate(evened)), np.arange(300))
  for idx in evened:
    packing.packed_batch(feats, idx, 32, rows, ())


def test_a_badly_fitting_batch_trades_sequences_instead_of_costing_every_step_a_row():
  # Rows of 16: batch 0 (10, 10, 7, 5) first-fit packs into 3 rows, the others (8, 8, 4, 4) 2.
  lengths = np.array([10, 10, 7, 5] + [8, 8, 4, 4] * 3)
  batches = [np.arange(4 * i, 4 * i + 4) for i in range(4)]
  assert packing.first_fit(lengths[batches[0]], T)[2] == 3
  (evened,), rows = packing.fit_rows([batches], lengths, T, unit=1)
  assert rows == 2 and all(packing.first_fit(lengths[b], T)[2] == 2 for b in evened)
  np.testing.assert_array_equal(np.sort(np.concatenate(evened)), np.arange(16))
  assert [len(b) for b in evened] == [4] * 4


@pytest.mark.parametrize("remat", [False, True])
def test_packed_logits_and_gradients_match_one_sequence_per_row(remat):
  """The same 10 sequences, packed into fewer rows and one per row: equal logits and equal
  gradients of the summed cross-entropy for every parameter."""
  model = heads.BertForSequenceClassification(CONFIG.replace(remat=remat), num_labels=3)
  feats, idx = features(10, seed=2), np.arange(10)
  keys = ("input_ids", "token_type_ids", "attention_mask", "labels")
  rows = packing.first_fit(feats.lengths, T)[2]
  packed = packing.packed_batch(feats, idx, 12, rows, keys)
  plain = make_batch(feats, idx, 12, [T], keys)
  params = nn.unbox(model.init(jax.random.key(0), plain["input_ids"], plain["token_type_ids"],
                               plain["attention_mask"])["params"])

  def loss(p, batch):
    logits = forward(model, p, batch)
    return _masked_ce(logits, batch["labels"], batch["weight"]), logits

  (want_loss, want), want_grads = jax.value_and_grad(loss, has_aux=True)(params, plain)
  (got_loss, got), got_grads = jax.value_and_grad(loss, has_aux=True)(params, packed)
  assert rows < 10 and got.shape == (12, 3)
  np.testing.assert_allclose(got[:10], want[:10], atol=1e-5)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(  # noqa: E731  float32 noise of the tensor
      a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()) + 1e-7)
  jax.tree.map(close, got_grads, want_grads)
