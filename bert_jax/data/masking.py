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

MASK_FRACTION = 0.8     # of chosen words: replaced by [MASK]
RANDOM_FRACTION = 0.1   # of chosen words: replaced by random tokens; the rest stay unchanged


class Masked(NamedTuple):
  input_ids: np.ndarray        # [N, L] int32, masking applied
  positions: np.ndarray        # [N, P] int32, sorted, 0 past `counts`
  labels: np.ndarray           # [N, P] int32, original ids at `positions`, 0 past `counts`
  counts: np.ndarray           # [N] int32, number of predictions per row


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
  # Global word id of every maskable token: running count of word starts over the flat batch.
  word_of_flat = np.cumsum(starts_NL.ravel()) - 1
  num_words = int(word_of_flat[-1]) + 1 if word_of_flat.size else 0
  maskable_flat = maskable_NL.ravel()
  word_size = np.bincount(word_of_flat[maskable_flat], minlength=num_words)
  word_row = np.nonzero(starts_NL.ravel())[0] // L
  budget_N = num_to_predict(maskable_NL.sum(axis=1), masked_lm_prob, P)

  # Visit each row's words in a random order: sort by (row, random key).
  order = np.lexsort((rng.random(num_words), word_row))
  row_first_word = np.searchsorted(word_row[order], np.arange(N))
  rank = np.empty(num_words, dtype=np.int64)
  rank[order] = np.arange(num_words) - row_first_word[word_row[order]]
  if continuation_NL is None or np.all(word_size == 1):
    chosen_word = rank < budget_N[word_row]
  else:
    chosen_word = _choose_words_greedily(order, word_size, word_row, row_first_word, budget_N)

  # 80/10/10, once per word; a random replacement is drawn per token.
  action_word = rng.random(num_words)
  chosen_flat = np.zeros(N * L, dtype=bool)
  chosen_flat[maskable_flat] = chosen_word[word_of_flat[maskable_flat]]
  chosen_NL = chosen_flat.reshape(N, L)
  action_flat = np.ones(N * L)
  action_flat[maskable_flat] = action_word[word_of_flat[maskable_flat]]
  action_NL = action_flat.reshape(N, L)
  random_NL = random_pool[rng.integers(0, len(random_pool), size=(N, L))]

  masked_NL = ids_NL.astype(np.int32, copy=True)
  to_mask = chosen_NL & (action_NL < MASK_FRACTION)
  to_random = chosen_NL & (action_NL >= MASK_FRACTION) & (action_NL < MASK_FRACTION + RANDOM_FRACTION)
  masked_NL[to_mask] = mask_id
  masked_NL[to_random] = random_NL[to_random]

  # Chosen positions in increasing order: a stable sort puts the True columns first.
  counts_N = chosen_NL.sum(axis=1).astype(np.int32)
  positions_NP = np.argsort(~chosen_NL, axis=1, kind="stable")[:, :P].astype(np.int32)
  if positions_NP.shape[1] < P:
    positions_NP = np.pad(positions_NP, ((0, 0), (0, P - positions_NP.shape[1])))
  valid_NP = np.arange(P)[None, :] < counts_N[:, None]
  positions_NP = np.where(valid_NP, positions_NP, 0).astype(np.int32)
  labels_NP = np.where(valid_NP, np.take_along_axis(ids_NL, positions_NP, axis=1), 0).astype(np.int32)
  return Masked(masked_NL, positions_NP, labels_NP, counts_N)


def _choose_words_greedily(order, word_size, word_row, row_first_word, budget_N) -> np.ndarray:
  """Whole words in random order, each taken if it still fits in the row's budget."""
  chosen = np.zeros(len(word_size), dtype=bool)
  sizes_in_order = word_size[order].tolist()
  order_list = order.tolist()
  row_end = np.append(row_first_word[1:], len(order)).tolist()
  for row, (begin, budget) in enumerate(zip(row_first_word.tolist(), budget_N.tolist())):
    used = 0
    for k in range(begin, row_end[row]):
      if used >= budget:
        break
      size = sizes_in_order[k]
      if used + size <= budget:
        chosen[order_list[k]] = True
        used += size
  return chosen


def random_token_pool(vocab_size: int, special_ids) -> np.ndarray:
  """Ids a 10%-random replacement is drawn from: the whole vocab except the special tokens."""
  keep = np.ones(vocab_size, dtype=bool)
  keep[np.asarray(list(special_ids), dtype=np.int64)] = False
  return np.nonzero(keep)[0].astype(np.int32)
