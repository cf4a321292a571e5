"""Masked-LM masking, vectorised over a batch of instances (static in create-data, dynamic in
the input pipeline).

The rules follow BERT: predict `masked_lm_prob` of the maskable tokens (never [CLS]/[SEP] or
padding), at least one and at most `max_predictions`; of the chosen positions 80% become
[MASK], 10% a random token, 10% stay unchanged. Candidates are whole words: a word is a
word-start token plus the continuation tokens after it (## pieces; for Chinese, the characters
of a segmenter word after the first). Without whole-word masking every token is its own word.
Words are visited in random order and taken while they fit in the budget (a word that would
overflow it is skipped, a later smaller one may still fit). The 80/10/10 decision is drawn
once per WORD, so the pieces of one word are all [MASK], all random, or all unchanged
(the per-piece decision of the original release is google-research/bert issue 910).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bert_jax.data import batch
from bert_jax.errors import UserError

MASK_FRACTION = 0.8     # of chosen words: replaced by [MASK]
RANDOM_FRACTION = 0.1   # of chosen words: replaced by random tokens; the rest stay unchanged


class Masked(NamedTuple):
  """Masked rows under the batch's names (batch.PRETRAINING)."""
  input_ids: np.ndarray            # [N, L] int32, masking applied
  masked_lm_positions: np.ndarray  # [N, P] int32, sorted, 0 past `num_predictions`
  masked_lm_ids: np.ndarray        # [N, P] int32, original ids at those positions, 0 past
  num_predictions: np.ndarray      # [N] int32, number of predictions per row

  def batch_fields(self) -> dict[str, np.ndarray]:
    """The batch fields masking sets: input_ids and the masked_lm_* three."""
    return dict(input_ids=self.input_ids, masked_lm_positions=self.masked_lm_positions,
                masked_lm_ids=self.masked_lm_ids,
                masked_lm_weights=batch.prediction_weights(self.num_predictions,
                                                           self.masked_lm_positions.shape[1]))


def num_to_predict(num_maskable: np.ndarray, masked_lm_prob: float, max_predictions: int) -> np.ndarray:
  """Per-row prediction budget: round(prob * maskable), at least 1, at most max_predictions."""
  budget = np.floor(num_maskable * masked_lm_prob + 0.5).astype(np.int64)
  budget = np.clip(budget, 1, max_predictions)
  return np.minimum(budget, num_maskable).astype(np.int64)


def word_starts(maskable_NL: np.ndarray, continuation_NL: np.ndarray | None) -> np.ndarray:
  """True where a maskable token starts a word. A continuation right after a non-maskable
  token (a segment that truncation cut mid-word) starts its own word."""
  if continuation_NL is None:
    return maskable_NL.copy()
  prev_maskable = np.zeros_like(maskable_NL)
  prev_maskable[:, 1:] = maskable_NL[:, :-1]
  return maskable_NL & (~continuation_NL | ~prev_maskable)


def mask_tokens(rng: np.random.Generator, ids_NL: np.ndarray, maskable_NL: np.ndarray,
                continuation_NL: np.ndarray | None, *, masked_lm_prob: float,
                max_predictions: int, mask_id: int, random_pool: np.ndarray) -> Masked:
  """Masks each row of `ids_NL` (padded); `maskable_NL` marks real non-special tokens.

  `continuation_NL` (bool, same shape) marks tokens that continue the previous token's word;
  None masks token by token. `random_pool` holds the ids a "random token" is drawn from.
  """
  N, L = ids_NL.shape
  P = max_predictions
  starts_NL = word_starts(maskable_NL, continuation_NL)
  budget_N = num_to_predict(maskable_NL.sum(axis=1), masked_lm_prob, P)
  # Words in a random order per row: sort the word-start columns by a random key.
  key_NL = rng.random((N, L))
  key_NL[~starts_NL] = 2.0
  words_N = starts_NL.sum(axis=1)
  whole_words = continuation_NL is not None and bool((starts_NL != maskable_NL).any())
  if not whole_words:
    # Every word is one token: take the `budget` smallest keys of each row (a partition and
    # a sort of the P smallest is cheaper than sorting whole rows).
    width = min(P, L)
    smallest_NP = np.sort(np.partition(key_NL, width - 1, axis=1)[:, :width], axis=1)
    threshold_N = np.take_along_axis(smallest_NP, np.maximum(budget_N - 1, 0)[:, None], 1)[:, 0]
    chosen_NL = (key_NL <= threshold_N[:, None]) & (budget_N > 0)[:, None] & starts_NL
    start_of_NL = np.broadcast_to(np.arange(L)[None, :], (N, L))
  else:
    order_NL = np.argsort(key_NL, axis=1)
    # Word id of each maskable token (a running count of starts) -> word sizes and starts.
    word_of_NL = np.cumsum(starts_NL, axis=1) - 1
    start_cols = np.flatnonzero(starts_NL.ravel()) % L
    word_base_N = np.concatenate([[0], np.cumsum(words_N)[:-1]])
    global_word_NL = word_base_N[:, None] + word_of_NL
    size_of_word = np.bincount(global_word_NL[maskable_NL], minlength=int(words_N.sum()))
    start_of_NL = np.where(maskable_NL, start_cols[np.clip(global_word_NL, 0, None)], 0) \
        if len(start_cols) else np.zeros((N, L), np.int64)
    size_at_NL = np.zeros((N, L), np.int64)
    size_at_NL[starts_NL] = size_of_word
    sizes_in_order_NL = np.take_along_axis(size_at_NL, order_NL, axis=1)
    chosen_start_NL = _choose_words_greedily(order_NL, sizes_in_order_NL, words_N, budget_N)
    chosen_NL = maskable_NL & np.take_along_axis(chosen_start_NL, start_of_NL, axis=1)

  # 80/10/10, once per word (the draw at the word's start); random ids per token.
  action_NL = np.take_along_axis(rng.random((N, L)), start_of_NL, axis=1)
  masked_NL = ids_NL.astype(np.int32, copy=True)
  to_mask = chosen_NL & (action_NL < MASK_FRACTION)
  to_random = chosen_NL & (action_NL >= MASK_FRACTION) & (action_NL < MASK_FRACTION + RANDOM_FRACTION)
  masked_NL[to_mask] = mask_id
  masked_NL[to_random] = random_pool[rng.integers(0, len(random_pool), size=int(to_random.sum()))]

  # Chosen positions in increasing order: nonzero walks the rows in order.
  counts_N = chosen_NL.sum(axis=1).astype(np.int32)
  rows, cols = np.nonzero(chosen_NL)
  slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts_N) - counts_N, counts_N)
  positions_NP = np.zeros((N, P), np.int32)
  positions_NP[rows, slot] = cols
  labels_NP = np.zeros((N, P), np.int32)
  labels_NP[rows, slot] = ids_NL[rows, cols]
  return Masked(masked_NL, positions_NP, labels_NP, counts_N)


def _choose_words_greedily(order_NL, sizes_in_order_NL, words_N, budget_N) -> np.ndarray:
  """Whole words in random order, each taken if it still fits in the row's budget (a word
  that would overflow is skipped; a later, smaller one may fit). Returns chosen word starts."""
  N, L = order_NL.shape
  # Vectorised up to the first word that does not fit; a short Python loop after it.
  cumulative_NL = np.cumsum(sizes_in_order_NL, axis=1)
  fits_NL = (cumulative_NL <= budget_N[:, None]) & (np.arange(L)[None, :] < words_N[:, None])
  prefix_N = np.argmin(fits_NL, axis=1)
  prefix_N[fits_NL.all(axis=1)] = L
  take_NL = np.arange(L)[None, :] < prefix_N[:, None]
  used_N = np.where(prefix_N > 0, np.take_along_axis(
      cumulative_NL, np.maximum(prefix_N - 1, 0)[:, None], axis=1)[:, 0], 0)
  for row in np.flatnonzero((used_N < budget_N) & (prefix_N < words_N)).tolist():
    used, budget = int(used_N[row]), int(budget_N[row])
    sizes = sizes_in_order_NL[row].tolist()
    for k in range(int(prefix_N[row]) + 1, int(words_N[row])):
      if used + sizes[k] <= budget:
        take_NL[row, k] = True
        used += sizes[k]
        if used == budget:
          break
  chosen_start_NL = np.zeros((N, L), bool)
  rows = np.broadcast_to(np.arange(N)[:, None], (N, L))
  chosen_start_NL[rows[take_NL], order_NL[take_NL]] = True
  return chosen_start_NL


def random_token_pool(vocab_size: int, special_ids) -> np.ndarray:
  """Ids a 10%-random replacement is drawn from: the whole vocab except the special tokens."""
  keep = np.ones(vocab_size, dtype=bool)
  keep[np.asarray(list(special_ids), dtype=np.int64)] = False
  pool = np.nonzero(keep)[0].astype(np.int32)
  if not len(pool):
    raise UserError(f"the vocab has {vocab_size} entries, all special tokens ([PAD], [UNK], "
                    "[CLS], [SEP], [MASK]); expected ordinary tokens to mask with")
  return pool
