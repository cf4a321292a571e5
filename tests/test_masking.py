"""Masking rules on synthetic batches: budgets, positions, 80/10/10, whole words."""

from __future__ import annotations

import numpy as np
import pytest

from bert_jax.data import masking

MASK_ID = 4
VOCAB = 30000
POOL = masking.random_token_pool(VOCAB, [0, 1, 2, 3, 4])


def _batch(rng, N=400, L=64):
  """Rows like [CLS] A [SEP] B [SEP] + padding, with ids >= 100 for real tokens."""
  lengths = rng.integers(10, L + 1, size=N)
  len_a = np.array([rng.integers(1, n - 3) for n in lengths])
  ids = rng.integers(100, VOCAB, size=(N, L)).astype(np.int32)
  cols = np.arange(L)[None, :]
  ids[cols >= lengths[:, None]] = 0
  ids[:, 0] = 2
  ids[np.arange(N), len_a + 1] = 3
  ids[np.arange(N), lengths - 1] = 3
  maskable = (cols < lengths[:, None]) & (ids >= 100)
  return ids, maskable


def _words(rng, maskable):
  """Random continuation flags: about 40% of tokens continue the previous word."""
  return maskable & (rng.random(maskable.shape) < 0.4)


def test_num_to_predict_rounds_and_caps():
  got = masking.num_to_predict(np.array([1, 3, 10, 100, 200, 0]), 0.15, 20)
  assert got.tolist() == [1, 1, 2, 15, 20, 0]


def test_word_starts_continuation_after_special_starts_a_word():
  maskable = np.array([[False, True, True, False, True, True]])
  cont = np.array([[False, False, True, False, True, False]])
  assert masking.word_starts(maskable, cont).tolist() == [[False, True, False, False, True, True]]


def test_token_masking_budget_positions_and_labels():
  rng = np.random.default_rng(0)
  ids, maskable = _batch(rng)
  m = masking.mask_tokens(np.random.default_rng(1), ids, maskable, None, masked_lm_prob=0.15,
                          max_predictions=8, mask_id=MASK_ID, random_pool=POOL)
  budget = masking.num_to_predict(maskable.sum(1), 0.15, 8)
  np.testing.assert_array_equal(m.num_predictions, budget)
  for n in range(len(ids)):
    pos = m.masked_lm_positions[n, :m.num_predictions[n]]
    assert np.all(np.diff(pos) > 0)
    assert maskable[n, pos].all()
    np.testing.assert_array_equal(m.masked_lm_ids[n, :m.num_predictions[n]], ids[n, pos])
    assert not m.masked_lm_positions[n, m.num_predictions[n]:].any()
    assert not m.masked_lm_ids[n, m.num_predictions[n]:].any()
    untouched = np.ones(ids.shape[1], bool)
    untouched[pos] = False
    np.testing.assert_array_equal(m.input_ids[n, untouched], ids[n, untouched])


def test_80_10_10_split():
  rng = np.random.default_rng(2)
  ids, maskable = _batch(rng, N=3000, L=128)
  m = masking.mask_tokens(np.random.default_rng(3), ids, maskable, None, masked_lm_prob=0.15,
                          max_predictions=20, mask_id=MASK_ID, random_pool=POOL)
  valid = np.arange(20)[None, :] < m.num_predictions[:, None]
  got = np.take_along_axis(m.input_ids, m.masked_lm_positions, 1)[valid]
  orig = m.masked_lm_ids[valid]
  total = valid.sum()
  frac_mask = np.mean(got == MASK_ID)
  frac_keep = np.mean(got == orig)
  frac_random = np.mean((got != MASK_ID) & (got != orig))
  assert total > 25000
  assert abs(frac_mask - 0.8) < 0.01 and abs(frac_keep - 0.1) < 0.01 and abs(frac_random - 0.1) < 0.01
  assert not np.isin(got[got != MASK_ID], [0, 1, 2, 3]).any()   # never a special token


def test_whole_word_masking_groups_and_decides_once_per_word():
  rng = np.random.default_rng(4)
  ids, maskable = _batch(rng, N=1500, L=64)
  cont = _words(rng, maskable)
  m = masking.mask_tokens(np.random.default_rng(5), ids, maskable, cont, masked_lm_prob=0.15,
                          max_predictions=10, mask_id=MASK_ID, random_pool=POOL)
  starts = masking.word_starts(maskable, cont)
  budget = masking.num_to_predict(maskable.sum(1), 0.15, 10)
  mixed_words = 0
  for n in range(len(ids)):
    chosen = np.zeros(ids.shape[1], bool)
    chosen[m.masked_lm_positions[n, :m.num_predictions[n]]] = True
    assert m.num_predictions[n] <= budget[n]
    word = np.cumsum(starts[n]) - 1
    sizes_unchosen = []
    for w in np.unique(word[maskable[n]]):
      members = maskable[n] & (word == w)
      if chosen[members].any():
        assert chosen[members].all(), "a word was masked in part"
        new, old = m.input_ids[n, members], ids[n, members]
        kinds = {"mask" if a == MASK_ID else "keep" if a == b else "random" for a, b in zip(new, old)}
        assert len(kinds) == 1, f"pieces of one word got different treatments: {kinds}"
        mixed_words += members.sum() > 1
      else:
        sizes_unchosen.append(members.sum())
    # Greedy with skipping: no unchosen word would still have fitted in the budget.
    if sizes_unchosen:
      assert min(sizes_unchosen) > budget[n] - m.num_predictions[n]
  assert mixed_words > 500   # multi-piece words were really exercised


def test_whole_word_80_10_10_is_per_word():
  rng = np.random.default_rng(6)
  ids, maskable = _batch(rng, N=3000, L=128)
  cont = _words(rng, maskable)
  m = masking.mask_tokens(np.random.default_rng(7), ids, maskable, cont, masked_lm_prob=0.15,
                          max_predictions=20, mask_id=MASK_ID, random_pool=POOL)
  valid = np.arange(20)[None, :] < m.num_predictions[:, None]
  starts = np.take_along_axis(masking.word_starts(maskable, cont), m.masked_lm_positions, 1) & valid
  got = np.take_along_axis(m.input_ids, m.masked_lm_positions, 1)[starts]
  orig = np.take_along_axis(ids, m.masked_lm_positions, 1)[starts]
  assert abs(np.mean(got == MASK_ID) - 0.8) < 0.015
  assert abs(np.mean(got == orig) - 0.1) < 0.015


def test_same_rng_same_masks_and_pool_excludes_specials():
  rng = np.random.default_rng(8)
  ids, maskable = _batch(rng, N=50)
  a = masking.mask_tokens(np.random.default_rng(9), ids, maskable, None, masked_lm_prob=0.15,
                          max_predictions=8, mask_id=MASK_ID, random_pool=POOL)
  b = masking.mask_tokens(np.random.default_rng(9), ids, maskable, None, masked_lm_prob=0.15,
                          max_predictions=8, mask_id=MASK_ID, random_pool=POOL)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert len(POOL) == VOCAB - 5 and not np.isin(POOL, [0, 1, 2, 3, 4]).any()


@pytest.mark.parametrize("whole_word", [False, True])
def test_short_rows_get_at_least_one_prediction(whole_word):
  ids = np.array([[2, 500, 3, 600, 3]], np.int32)
  maskable = np.array([[False, True, False, True, False]])
  cont = np.zeros_like(maskable) if whole_word else None
  m = masking.mask_tokens(np.random.default_rng(0), ids, maskable, cont, masked_lm_prob=0.15,
                          max_predictions=20, mask_id=MASK_ID, random_pool=POOL)
  assert m.num_predictions.tolist() == [1] and m.masked_lm_positions[0, 0] in (1, 3)
