"""QA feature rows as whole-array numpy (see qa.featurize for how they fit together): the
windows over each example's context tokens, the window that gives each token its most
context, the answer's tokens, and the [rows, L] grids. Only `training_spans` steps through the
examples in Python (the answer fields, an error naming the first bad one). Token tagging
(featurize.featurize_tags) windows long sentences with `windows` and `max_context_spans` too."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from bert_jax.errors import UserError


def windows(n_doc: np.ndarray, max_doc: np.ndarray, doc_stride: int):
  """(example, start, length) of the windows over each example's `n_doc` context tokens:
  `max_doc` long, min(max_doc, doc_stride) apart, the last one reaching the end (one empty
  window for an empty context)."""
  step = np.minimum(max_doc, doc_stride)
  count = np.where(n_doc > max_doc, -(-(n_doc - max_doc) // step) + 1, 1)
  example = np.repeat(np.arange(len(n_doc)), count)
  start = (np.arange(len(example)) - (np.cumsum(count) - count)[example]) * step[example]
  return example, start, np.minimum(n_doc[example] - start, max_doc[example])


def max_context_spans(n_doc: np.ndarray, max_doc: np.ndarray, doc_stride: int,
                      example: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[lo, hi) of the context tokens to which each window (as from `windows`) gives the most
  context: run_squad's score, the shorter side's context + 0.01 x the window's length (here
  100 x context + length, in integers), ties to the earlier window. Equal to comparing every
  window on every token, in O(windows x log max_doc).

  All windows but an example's last are max_doc long, so among them a token goes to the one
  whose centre is nearest (ties: the earlier): ranges cut halfway between the centres. The
  last window (it may be shorter) wins a suffix: up to its centre its score rises by one a
  token while the best other's rises by at most one, and past it both fall by one (the other
  centres lie to its left) until no other window holds the token. Its start: by bisection."""
  step = np.minimum(max_doc, doc_stride)
  count = np.bincount(example, minlength=len(n_doc))
  last_start = (count - 1) * step
  half = (max_doc - 1 + step) // 2      # a token past s + half is nearer the next centre

  def last_wins(t: np.ndarray) -> np.ndarray:
    """Whether the last window beats the others at token t (of a multi-window example)."""
    near = np.clip((t - half - 1) // step + 1, 0, count - 2) * step  # nearest full window
    other = np.minimum(t - near, near + max_doc - 1 - t)              # < 0: not in it
    own = np.minimum(t - last_start, n_doc - 1 - t)
    return (other < 0) | (100 * own + n_doc - last_start > 100 * other + max_doc)

  low, high = last_start.copy(), np.maximum(n_doc - 1, last_start)  # it wins the last token
  for _ in range(int(max_doc.max()).bit_length() + 1):
    mid = (low + high) // 2
    wins = last_wins(mid)
    high, low = np.where(wins, mid, high), np.where(wins, low, mid + 1)
  suffix = np.where(count > 1, high, 0)               # the last window's first token
  index = np.arange(len(example)) - (np.cumsum(count) - count)[example]
  own_lo = np.where(index > 0, start - step[example] + half[example] + 1, 0)
  before_last = index == count[example] - 2        # reaches up to the last window's suffix
  own_hi = np.where(before_last, suffix[example],
                    np.minimum(start + half[example] + 1, suffix[example]))
  final = index == count[example] - 1
  return np.where(final, suffix[example], own_lo), np.where(final, n_doc[example], own_hi)


def answer_tokens(spans: np.ndarray, docs, context_of: np.ndarray) -> tuple[np.ndarray,
                                                                            np.ndarray]:
  """First and last token of context `context_of[i]` in `docs` overlapping character span
  spans[i] ([start, end); -1: none), -1 where none does (no span, or only characters the
  tokenizer drops). Token offsets ascend within a context (as BERT's pre-tokenizer makes
  them), so the overlapping tokens run from the first ending after the span's start to the
  last starting before its end: two binary searches over all contexts' tokens at once."""
  offsets, splits = docs.offsets.astype(np.int64), docs.splits
  width = int(max(offsets.max(initial=0), spans.max(initial=0))) + 2
  owner = np.repeat(np.arange(len(splits) - 1) * width, np.diff(splits))
  key_start, key_end = owner + offsets[:, 0], owner + offsets[:, 1]
  if np.any(np.diff(key_start) < 0) or np.any(np.diff(key_end) < 0):
    return _answer_tokens_each(spans, docs, context_of)
  base = context_of * width
  first = np.searchsorted(key_end, base + spans[:, 0], side="right")
  stop = np.searchsorted(key_start, base + spans[:, 1], side="left")
  hit = (spans[:, 0] >= 0) & (first < stop)
  inside = splits[context_of]
  return np.where(hit, first - inside, -1), np.where(hit, stop - 1 - inside, -1)


def _answer_tokens_each(spans, docs, context_of):
  """answer_tokens one example at a time, for offsets that do not ascend."""
  first, last = np.full(len(spans), -1), np.full(len(spans), -1)
  for index in np.flatnonzero(spans[:, 0] >= 0):
    context = context_of[index]
    offsets = docs.offsets[docs.splits[context]:docs.splits[context + 1]]
    overlapping = np.flatnonzero((offsets[:, 0] < spans[index, 1])
                                 & (offsets[:, 1] > spans[index, 0]))
    if len(overlapping):
      first[index], last[index] = overlapping[0], overlapping[-1]
  return first, last


def training_spans(examples, is_training: bool) -> np.ndarray:
  """[start, end) characters of each example's first located answer ([-1, -1]: none, or an
  impossible question); in training, a possible question without one is an error."""
  spans = np.full((len(examples), 2), -1, np.int64)
  for index, example in enumerate(examples):
    span = None if example.is_impossible else example.answer_char_span()
    if span is not None:
      spans[index] = span
    elif is_training and not example.is_impossible:
      raise UserError(f"{example.source or 'QA data'}: question id {example.id!r}: no answer "
                      "with a position in the context to train on")
  return spans


def fill_rows(tokenizer, seq_len: int, queries, query_len: np.ndarray, docs,
              context_of: np.ndarray, example: np.ndarray, start: np.ndarray,
              length: np.ndarray):
  """input_ids, token_type_ids, attention_mask [rows, L] and token_to_char [rows, L, 2] of the
  rows [CLS] question [SEP] window [SEP] padding.

  The context tokens are laid out with [SEP] and a row's worth of padding after each context,
  so that every row is one slice of them, copied whole (a window but the last is max_doc
  long: its [SEP] falls in the last column, written after); then the header columns are
  written over. A copy per row instead of an index or a mask per cell."""
  rows, L = len(example), seq_len
  head = (query_len + 2)[example]
  ends = head + length                                       # the final [SEP]
  every = np.arange(rows)
  n_contexts, lengths = len(docs), docs.lengths
  laid_first = L + docs.splits[:-1] + np.arange(n_contexts) * (L + 1)  # padding before each
  at = np.repeat(laid_first - docs.splits[:-1], lengths) + np.arange(len(docs.ids))
  laid_ids = np.full(L + len(docs.ids) + n_contexts * (L + 1), tokenizer.pad_id, np.int32)
  laid_ids[at] = docs.ids
  laid_ids[laid_first + lengths] = tokenizer.sep_id
  laid_pairs = np.full(len(laid_ids), -1, np.int64)          # (start, end) as one item
  laid_pairs[at] = np.ascontiguousarray(docs.offsets).view(np.int64)[:, 0]
  first_column = laid_first[context_of][example] + start - head
  input_ids = sliding_window_view(laid_ids, L)[first_column]
  input_ids[every, ends] = tokenizer.sep_id
  pairs = sliding_window_view(laid_pairs, L)[first_column]
  pairs[every, ends] = -1

  # the header columns: [CLS] question [SEP], from each example's header
  width = int(head.max())
  header_len = query_len + 2
  header_first = np.cumsum(header_len) - header_len
  headers = np.full(int(header_len.sum()) + width, tokenizer.cls_id, np.int32)
  headers[header_first + header_len - 1] = tokenizer.sep_id
  query_first = np.cumsum(query_len) - query_len
  n_query = int(query_len.sum())
  headers[np.repeat(header_first + 1 - query_first, query_len) + np.arange(n_query)] = (
      queries.ids[np.repeat(queries.splits[:-1] - query_first, query_len) + np.arange(n_query)])
  in_header = np.arange(width) < head[:, None]
  np.copyto(input_ids[:, :width], sliding_window_view(headers, width)[header_first[example]],
            where=in_header)
  np.copyto(pairs[:, :width], -1, where=in_header)

  up_to = np.concatenate([np.ones(L, np.int32), np.zeros(L, np.int32)])
  attention_mask = sliding_window_view(up_to, L)[L - 1 - ends]  # ones in columns 0..ends
  token_type_ids = attention_mask.copy()
  np.copyto(token_type_ids[:, :width], 0, where=in_header)
  return input_ids, token_type_ids, attention_mask, pairs.view(np.int32).reshape(rows, L, 2)
