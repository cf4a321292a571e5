"""Next-sentence-prediction instances from tokenised documents, as BERT's create-data makes them.

Per document: sentences are gathered into a segment until it reaches a target length
(max_seq_length - 3; with probability short_seq_prob a random shorter target, to lessen the
mismatch with short fine-tuning inputs). The segment is cut at a random sentence boundary into
A and B; half of the time (and always when the segment has one sentence) B is replaced by text
from a random other document, and the sentences of the real B are put back to start the next
segment. The pair is trimmed to fit, one token at a time from the longer side, at a random end.

Everything is index arithmetic over one flat array of token ids per chunk of documents: an
instance is two ranges (A, B) into it, so long documents and long lines cost no copies.
"""

from __future__ import annotations

import random
from typing import NamedTuple, Sequence

import numpy as np


class NSPWarning(UserWarning):
  """The corpus makes weak next-sentence pairs (one-sentence documents, one huge document)."""


class Chunk(NamedTuple):
  """Tokenised documents: all token ids in one flat array; `sentence_bounds[d]` lists the
  offsets where document d's sentences start, followed by its end offset."""
  ids: np.ndarray                      # [T] int32
  continuation: np.ndarray | None      # [T] bool: token continues the previous token's word
  sentence_bounds: list[list[int]]


class PairSpans(NamedTuple):
  """N instances as token ranges into Chunk.ids: A = [a_start, a_end), B = [b_start, b_end)."""
  a_start: np.ndarray
  a_end: np.ndarray
  b_start: np.ndarray
  b_end: np.ndarray
  is_random_next: np.ndarray           # [N] int32: 1 when B comes from another document


def build_chunk(doc_token_lists: Sequence[Sequence[Sequence[int]]],
                doc_continuations: Sequence[Sequence[np.ndarray]] | None = None) -> Chunk:
  """Flattens documents (lists of sentence id lists); empty sentences and documents drop out."""
  pieces: list[np.ndarray] = []
  cont_pieces: list[np.ndarray] = []
  bounds: list[list[int]] = []
  offset = 0
  for d, sentences in enumerate(doc_token_lists):
    starts = []
    for s, sentence in enumerate(sentences):
      if len(sentence) == 0:
        continue
      starts.append(offset)
      pieces.append(np.asarray(sentence, dtype=np.int32))
      if doc_continuations is not None:
        cont_pieces.append(np.asarray(doc_continuations[d][s], dtype=bool))
      offset += len(sentence)
    if starts:
      bounds.append(starts + [offset])
  ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
  continuation = None
  if doc_continuations is not None:
    continuation = np.concatenate(cont_pieces) if cont_pieces else np.zeros(0, bool)
  return Chunk(ids, continuation, bounds)


def trim_pair(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
  """Lengths after removing tokens one at a time from the longer side (B on a tie)."""
  excess = len_a + len_b - max_tokens
  if excess <= 0:
    return len_a, len_b
  gap = abs(len_a - len_b)
  from_longer = min(excess, gap)
  if len_a > len_b:
    len_a -= from_longer
  else:
    len_b -= from_longer
  rest = excess - from_longer          # now equal: alternate, B first
  return len_a - rest // 2, len_b - (rest - rest // 2)


def _trim_ends(rng: random.Random, start: int, end: int, new_len: int) -> tuple[int, int]:
  """Removes tokens from a random end (a fair coin per token) down to `new_len`."""
  removed = (end - start) - new_len
  if removed <= 0:
    return start, end
  from_front = bin(rng.getrandbits(removed)).count("1")   # Binomial(removed, 1/2)
  return start + from_front, end - (removed - from_front)


def document_pairs(chunk: Chunk, doc: int, rng: random.Random, *, max_seq_length: int,
                   short_seq_prob: float, out: list[tuple[int, int, int, int, int]],
                   counts: dict | None = None) -> None:
  """Appends (a_start, a_end, b_start, b_end, is_random_next) for document `doc` to `out`.
  `counts` (if given) adds up the random Bs that were forced ("forced_random": the segment was
  one sentence, so it has no real B) and those from the same document ("random_same_document":
  the chunk has no other): both weaken next-sentence prediction."""
  max_tokens = max_seq_length - 3    # room for [CLS] A [SEP] B [SEP]
  target = max_tokens
  if rng.random() < short_seq_prob:
    target = rng.randint(2, max_tokens)
  bounds = chunk.sentence_bounds[doc]
  num_sentences = len(bounds) - 1
  num_docs = len(chunk.sentence_bounds)
  first = 0      # first sentence of the segment being gathered
  i = 0
  while i < num_sentences:
    segment_len = bounds[i + 1] - bounds[first]
    if i + 1 < num_sentences and segment_len < target:
      i += 1
      continue
    # The segment is sentences first..i. A takes the first a_count of them.
    count = i - first + 1
    a_count = rng.randint(1, count - 1) if count >= 2 else 1
    a_start, a_end = bounds[first], bounds[first + a_count]
    if count == 1 or rng.random() < 0.5:
      is_random = 1
      target_b = target - (a_end - a_start)
      other = doc
      for _ in range(10):            # another document, if the chunk has one
        other = rng.randrange(num_docs)
        if other != doc:
          break
      if counts is not None:
        counts["forced_random"] += count == 1
        counts["random_same_document"] += other == doc
      other_bounds = chunk.sentence_bounds[other]
      j = rng.randrange(len(other_bounds) - 1)
      b_start = other_bounds[j]
      b_end = other_bounds[j + 1]
      while b_end - b_start < target_b and j + 2 < len(other_bounds):
        j += 1
        b_end = other_bounds[j + 1]
      next_first = first + a_count    # the real B's sentences start the next segment
    else:
      is_random = 0
      b_start, b_end = a_end, bounds[i + 1]
      next_first = i + 1
    len_a, len_b = trim_pair(a_end - a_start, b_end - b_start, max_tokens)
    a_start, a_end = _trim_ends(rng, a_start, a_end, len_a)
    b_start, b_end = _trim_ends(rng, b_start, b_end, len_b)
    out.append((a_start, a_end, b_start, b_end, is_random))
    first = i = next_first


def chunk_pairs(chunk: Chunk, rng: random.Random, *, max_seq_length: int, short_seq_prob: float,
                dupe_factor: int, counts: dict | None = None) -> PairSpans:
  """All instances of a chunk: `dupe_factor` passes over its documents, in a shuffled order
  (`counts`: see document_pairs)."""
  rows: list[tuple[int, int, int, int, int]] = []
  for _ in range(dupe_factor):
    for doc in range(len(chunk.sentence_bounds)):
      document_pairs(chunk, doc, rng, max_seq_length=max_seq_length,
                     short_seq_prob=short_seq_prob, out=rows, counts=counts)
  rng.shuffle(rows)
  table = np.array(rows, dtype=np.int64).reshape(-1, 5)
  return PairSpans(table[:, 0], table[:, 1], table[:, 2], table[:, 3],
                   table[:, 4].astype(np.int32))


class Assembled(NamedTuple):
  ids_NL: np.ndarray            # [N, L] int32: [CLS] A [SEP] B [SEP], 0-padded
  lengths: np.ndarray           # [N] int32: real tokens per row
  len_a: np.ndarray             # [N] int32
  maskable_NL: np.ndarray       # [N, L] bool: real tokens other than [CLS]/[SEP]
  continuation_NL: np.ndarray | None


def assemble(chunk: Chunk, spans: PairSpans, *, cls_id: int, sep_id: int) -> Assembled:
  """Gathers the A and B ranges into fixed-width rows (width = the longest row)."""
  len_a = (spans.a_end - spans.a_start).astype(np.int32)
  len_b = (spans.b_end - spans.b_start).astype(np.int32)
  lengths = len_a + len_b + 3
  L = int(lengths.max()) if len(lengths) else 3
  cols = np.arange(L, dtype=np.int32)[None, :]
  in_a = (cols >= 1) & (cols <= len_a[:, None])
  b_first = len_a[:, None] + 2
  in_b = (cols >= b_first) & (cols < b_first + len_b[:, None])
  a_offset = (spans.a_start - 1).astype(np.int32)[:, None]
  b_offset = spans.b_start.astype(np.int32)[:, None] - b_first
  src = np.where(in_a, a_offset + cols, b_offset + cols)
  src = np.where(in_a | in_b, src, 0)
  maskable = in_a | in_b
  ids = np.where(maskable, chunk.ids[src] if len(chunk.ids) else 0, 0).astype(np.int32)
  ids[:, 0] = cls_id
  rows = np.arange(len(lengths))
  ids[rows, len_a + 1] = sep_id
  ids[rows, lengths - 1] = sep_id
  continuation = None
  if chunk.continuation is not None:
    continuation = np.where(maskable, chunk.continuation[src], False)
  return Assembled(ids, lengths, len_a, maskable, continuation)
