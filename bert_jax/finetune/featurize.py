"""Featurisation: classification, token tagging and multiple choice records (read by
readers.py; span QA's featurisation is qa.py's) into `Features`: numpy arrays padded to
max_seq_length on the last axis plus each row's real length, so the batcher can cut a batch
down to a small bucket length. Bad input raises UserError naming the file and line (or record).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from bert_jax.data.batch import IGNORE  # label of positions that do not count in the loss
from bert_jax.errors import UserError
from bert_jax.finetune import qa_windows
from bert_jax.finetune.readers import ChoiceRecord, TaggedSentence, TextRecord


@dataclasses.dataclass
class Features:
  """Token arrays [N, ..., T] padded with 0 to T = max_seq_length; `lengths` [N] the longest
  real row; `seq_keys` the arrays whose last axis is the token axis; labels and the rest [N, ...]."""
  arrays: dict[str, np.ndarray]
  lengths: np.ndarray
  seq_keys: tuple[str, ...] = ("input_ids", "token_type_ids", "attention_mask")
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.lengths)


# ----------------------------------------------------------------------------- packing

def truncate_pair(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int]]:
  """Longest-first truncation with the split transformers' fast tokenizers use: the shorter
  side keeps what it can up to half the budget, the longer side gets the rest (the odd token)."""
  b = b or []
  if len(a) + len(b) <= budget:
    return a, b
  short, long_ = sorted((len(a), len(b)))
  keep_long = max(short, budget - short)
  keep_short = short
  if keep_short + keep_long > budget:
    keep_short, keep_long = budget // 2, budget // 2 + budget % 2
  keep_a, keep_b = (keep_long, keep_short) if len(a) > len(b) else (keep_short, keep_long)
  return a[:min(keep_a, len(a))], b[:min(keep_b, len(b))]


def pack(tokenizer, a: list[int], b: list[int] | None, max_len: int,
         ids_out: np.ndarray, types_out: np.ndarray) -> int:
  """[CLS] a [SEP] (b [SEP]) written into the zero rows; returns the length."""
  budget = max_len - (3 if b is not None else 2)
  a, b2 = truncate_pair(a, b, budget)
  row = [tokenizer.cls_id, *a, tokenizer.sep_id]
  n_first = len(row)
  if b is not None:
    row += [*b2, tokenizer.sep_id]
  ids_out[:len(row)] = row
  types_out[n_first:len(row)] = 1
  return len(row)


def _attention(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  return (np.arange(ids.shape[-1]) < lengths[..., None]).astype(np.int32)


def featurize_text(records: Sequence[TextRecord], tokenizer, max_seq_length: int,
                   label_names: Sequence[str], regression: bool, path: str,
                   labeled: bool = True) -> Features:
  """`labeled=False` (a test file for prediction): labels are left 0."""
  n = len(records)
  ids = np.zeros((n, max_seq_length), np.int32)
  types = np.zeros((n, max_seq_length), np.int32)
  lengths = np.zeros(n, np.int32)
  a_ids = tokenizer.encode_batch([r.text for r in records])
  has_pair = any(r.pair is not None for r in records)
  b_ids = tokenizer.encode_batch([r.pair or "" for r in records]) if has_pair else [None] * n
  for i in range(n):
    b = b_ids[i] if records[i].pair is not None else None
    lengths[i] = pack(tokenizer, a_ids[i], b, max_seq_length, ids[i], types[i])
  if not labeled:
    labels = np.zeros(n, np.float32 if regression else np.int32)
  elif regression:
    labels = np.array([float(r.label) for r in records], np.float32)
  else:
    index = {name: i for i, name in enumerate(label_names)}
    labels = np.zeros(n, np.int32)
    for i, r in enumerate(records):
      if r.label not in index:
        raise UserError(f"{path}:{r.line}: label {r.label!r} does not occur in the training "
                        f"file (known: {', '.join(label_names[:20])})")
      labels[i] = index[r.label]
  return Features({"input_ids": ids, "token_type_ids": types,
                   "attention_mask": _attention(ids, lengths), "labels": labels}, lengths)


def featurize_tags(sentences: Sequence[TaggedSentence], tokenizer, max_seq_length: int,
                   names: Sequence[str], path: str, doc_stride: int | None = None) -> Features:
  """One row [CLS] window [SEP] per window over each sentence's sub-tokens: windows of
  max_seq_length - 2 tokens, `doc_stride` apart (default: half a window), as QA's over its
  contexts (qa_windows), so no word is lost to a long sentence. The label sits on each word's
  first sub-token in every window that holds it; later pieces and specials get IGNORE.
  `extra`: per word (all sentences back to back, `word_splits` [sentences + 1]) the row and
  column where it is predicted, `word_rows` / `word_columns`: the window that gives its first
  sub-token the most context (run_squad's rule, qa_windows.max_context_spans)."""
  max_doc = max_seq_length - 2
  if max_doc < 1:
    raise UserError(f"--max-seq-length {max_seq_length}: no room for a word beside [CLS] and "
                    "[SEP]; expected 3 or more")
  stride = doc_stride or max(1, max_doc // 2)
  if stride < 1:
    raise UserError(f"--doc-stride: expected a positive number of tokens, got {doc_stride}")
  index = {n: i for i, n in enumerate(names)}
  word_splits = np.cumsum([0] + [len(s.words) for s in sentences])
  tag_ids = np.array([index.get(t, -1) for s in sentences for t in s.tags], np.int32)
  if (tag_ids < 0).any():
    word = int(np.argmax(tag_ids < 0))
    i = int(np.searchsorted(word_splits, word, side="right")) - 1
    s = sentences[i]
    raise UserError(f"{path}:{s.line + word - word_splits[i]}: tag "
                    f"{s.tags[word - word_splits[i]]!r} does not occur in the training file "
                    f"(known: {', '.join(names[:20])})")
  pieces = tokenizer.encode_ragged([w for s in sentences for w in s.words])
  n_pieces, piece_ids = pieces.lengths, pieces.ids
  if (n_pieces == 0).any():  # e.g. a lone control character: [UNK] keeps the word's place
    piece_ids = np.insert(piece_ids, pieces.splits[:-1][n_pieces == 0], tokenizer.unk_id)
    n_pieces = np.maximum(n_pieces, 1)
  first_piece = np.cumsum(n_pieces) - n_pieces      # each word's, all sentences back to back
  doc_first = np.append(first_piece, len(piece_ids))[word_splits]  # each sentence's
  n_doc = np.diff(doc_first)
  max_docs = np.full(len(sentences), max_doc)
  example, start, length = qa_windows.windows(n_doc, max_docs, stride)
  own_lo, own_hi = qa_windows.max_context_spans(n_doc, max_docs, stride, example, start)

  rows = len(example)
  column_0 = doc_first[example] + start - 1         # the piece column c holds: column_0 + c
  column = np.arange(max_seq_length)
  inside = (column >= 1) & (column <= length[:, None])
  ids = np.zeros((rows, max_seq_length), np.int32)
  ids[inside] = piece_ids[(column_0[:, None] + column)[inside]]
  ids[:, 0] = tokenizer.cls_id
  ids[np.arange(rows), length + 1] = tokenizer.sep_id
  lengths = (length + 2).astype(np.int32)
  labels = np.full((rows, max_seq_length), IGNORE, np.int32)
  row, word = _words_in(first_piece, column_0 + 1, column_0 + 1 + length)
  labels[row, first_piece[word] - column_0[row]] = tag_ids[word]
  # The max-context spans split each sentence's tokens among its windows: one owner a word,
  # found in word order.
  owner, word = _words_in(first_piece, doc_first[example] + own_lo, doc_first[example] + own_hi)
  assert np.array_equal(word, np.arange(len(first_piece)))
  return Features({"input_ids": ids, "token_type_ids": np.zeros_like(ids),
                   "attention_mask": _attention(ids, lengths), "labels": labels}, lengths,
                  seq_keys=("input_ids", "token_type_ids", "attention_mask", "labels"),
                  extra={"word_rows": owner.astype(np.int32),
                         "word_columns": (first_piece - column_0[owner]).astype(np.int32),
                         "word_splits": word_splits})


def _words_in(first_piece: np.ndarray, lo: np.ndarray, hi: np.ndarray):
  """(row, word) for every word whose first piece lies in [lo[row], hi[row]) (`first_piece`
  ascends), rows in order and words ascending within each."""
  a = np.searchsorted(first_piece, lo)
  count = np.searchsorted(first_piece, hi) - a
  row = np.repeat(np.arange(len(lo)), count)
  return row, np.arange(len(row)) - np.repeat(np.cumsum(count) - count - a, count)


def word_predictions(feats: Features, prediction: np.ndarray) -> list[np.ndarray]:
  """Each sentence's predicted tag ids, one a word, from `prediction` [rows, T] of the rows of
  featurize_tags: read where the word has the most context."""
  per_word = prediction[feats.extra["word_rows"], feats.extra["word_columns"]]
  return np.split(per_word, feats.extra["word_splits"][1:-1])


def featurize_choice(records: Sequence[ChoiceRecord], tokenizer, max_seq_length: int,
                     num_choices: int | None = None) -> Features:
  """[N, C, T] arrays; records with fewer than C candidates are padded, `choice_mask` 0."""
  c = num_choices or max(len(r.second) for r in records)
  n = len(records)
  ids = np.zeros((n, c, max_seq_length), np.int32)
  types = np.zeros_like(ids)
  row_len = np.zeros((n, c), np.int32)
  firsts = tokenizer.encode_batch([t for r in records for t in r.first])
  seconds = tokenizer.encode_batch([t for r in records for t in r.second])
  k = 0
  for i, r in enumerate(records):
    if len(r.second) > c:
      raise UserError(f"record {r.id}: {len(r.second)} candidates; the training data has {c}")
    for j in range(len(r.second)):
      row_len[i, j] = pack(tokenizer, firsts[k], seconds[k], max_seq_length, ids[i, j], types[i, j])
      k += 1
  choice_mask = (row_len > 0).astype(np.int32)
  return Features({"input_ids": ids, "token_type_ids": types,
                   "attention_mask": _attention(ids, row_len),
                   "labels": np.array([r.label for r in records], np.int32),
                   "choice_mask": choice_mask}, row_len.max(axis=1))
