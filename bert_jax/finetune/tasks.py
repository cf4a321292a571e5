"""Task featurisation: classification, token tagging and multiple choice records (read by
readers.py) into `Features`: numpy arrays padded to max_seq_length on the last axis plus each
row's real length, so the batcher can cut a batch down to a small bucket length. Bad input
raises UserError naming the file and line (or record).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import numpy as np

from bert_jax.errors import UserError
# The readers' names stay importable from here, where callers have always found them.
from bert_jax.finetune.readers import (ChoiceRecord, TaggedSentence, TextRecord,  # noqa: F401
                                       build_label_map, read_choice, read_choice_json,
                                       read_conll, read_swag, read_text_records, tag_names)

IGNORE = -100  # label of positions that do not count in the loss (as transformers)


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
                   label_names: Sequence[str], regression: bool, path: str) -> Features:
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
  if regression:
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
                   names: Sequence[str], path: str) -> Features:
  """The label sits on each word's first sub-token; later pieces and specials get IGNORE.
  `extra["first_positions"][i]` holds each kept word's first-piece position (words past
  max_seq_length are cut and predicted "O")."""
  index = {n: i for i, n in enumerate(names)}
  n = len(sentences)
  ids = np.zeros((n, max_seq_length), np.int32)
  labels = np.full((n, max_seq_length), IGNORE, np.int32)
  lengths = np.zeros(n, np.int32)
  flat_words = [w for s in sentences for w in s.words]
  flat_pieces = tokenizer.encode_batch(flat_words)
  first_positions, cursor, cut = [], 0, 0
  for i, s in enumerate(sentences):
    row, positions = [tokenizer.cls_id], []
    for j, (word, tag) in enumerate(zip(s.words, s.tags)):
      pieces = flat_pieces[cursor + j] or [tokenizer.unk_id]  # e.g. a lone control character
      if tag not in index:
        raise UserError(f"{path}:{s.line + j}: tag {tag!r} does not occur in the training "
                        f"file (known: {', '.join(names[:20])})")
      if len(row) + len(pieces) > max_seq_length - 1:
        break
      labels[i, len(row)] = index[tag]
      positions.append(len(row))
      row += pieces
    cursor += len(s.words)
    cut += len(s.words) - len(positions)
    row.append(tokenizer.sep_id)
    ids[i, :len(row)] = row
    lengths[i] = len(row)
    first_positions.append(np.array(positions, np.int32))
  if cut:  # as QA warns of unreachable answers: these labels are neither trained nor scored
    warnings.warn(f"{path}: {cut} of {len(flat_words)} words lie past --max-seq-length "
                  f"{max_seq_length} and are cut (not trained, predicted 'O'); raise "
                  "--max-seq-length, or split long sentences (a blank line between sentences)",
                  stacklevel=2)
  return Features({"input_ids": ids, "token_type_ids": np.zeros_like(ids),
                   "attention_mask": _attention(ids, lengths), "labels": labels}, lengths,
                  seq_keys=("input_ids", "token_type_ids", "attention_mask", "labels"),
                  extra={"first_positions": first_positions})


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
