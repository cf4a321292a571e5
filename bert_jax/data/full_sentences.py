"""MLM-only instances (`create-data --objective mlm`): text packed into full rows.

A row is one segment, `[CLS] text [SEP]` (token type 0 everywhere, no NSP label), its text
exactly max_seq_length - 2 tokens of contiguous sentences: a sentence that does not fit ends
the row and continues at the start of the next (as Hugging Face's `group_texts` and Cramming
cut; RoBERTa's rows end at sentence boundaries, so they are not all full).

FULL-SENTENCES (the default, RoBERTa's): rows cross document boundaries, with one [SEP] between
two documents (never at the start of a row: a document that ends a row is ended by the row's
own [SEP]). A chunk of documents (create.py) is packed alone in a worker; the tokens after its
last full row (its tail) come back to the main process, which joins the tails of consecutive
chunks of a split, [SEP] between them, into further full rows (`TailPacker`, masked with a
generator seeded by the chunk that completes the row). So every row of a split is full except
its very last one (with its dupe_factor copies: the split's last dupe_factor records, in its
last shard).

DOC-SENTENCES (--doc-sentences): rows stay within a document, so the last row of every
document is the short one (padded in a batch, like RoBERTa's DOC-SENTENCES inputs).

Each row is written dupe_factor times in a row (consecutive records), each copy masked anew
under static masking. Whole-word masking and Chinese word continuation come with the chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bert_jax.data import row_records
from bert_jax.data.instances import Assembled, Chunk

TAIL_STREAM = 2   # keeps the tail rows' masking generator apart from the chunks'


class Stream(NamedTuple):
  """Token ids with the [SEP]s between documents in place (boundary marks them)."""
  ids: np.ndarray                 # [T] int32
  continuation: np.ndarray | None  # [T] bool
  boundary: np.ndarray            # [T] bool

  def __len__(self) -> int:
    return len(self.ids)

  def slice(self, start: int, end: int | None = None) -> "Stream":
    return Stream(self.ids[start:end], None if self.continuation is None
                  else self.continuation[start:end], self.boundary[start:end])


def joined(parts: list[Stream], sep_id: int) -> Stream:
  """Non-empty streams joined by one [SEP] each."""
  parts = [p for p in parts if len(p)]
  sep = Stream(np.array([sep_id], np.int32), np.zeros(1, bool), np.ones(1, bool))
  pieces = [x for p in parts for x in (sep, p)][1:]
  if not pieces:
    return Stream(np.zeros(0, np.int32), None, np.zeros(0, bool))
  cont = None if parts[0].continuation is None else np.concatenate(
      [p.continuation for p in pieces])
  return Stream(np.concatenate([p.ids for p in pieces]), cont,
                np.concatenate([p.boundary for p in pieces]))


def document_streams(chunk: Chunk) -> list[Stream]:
  out = []
  for bounds in chunk.sentence_bounds:
    start, end = bounds[0], bounds[-1]
    out.append(Stream(chunk.ids[start:end], None if chunk.continuation is None
                      else chunk.continuation[start:end], np.zeros(end - start, bool)))
  return out


def cut_full(stream: Stream, width: int) -> tuple[list[tuple[int, int]], int]:
  """(start, end) of every full row of `width` tokens, and where the rest (the tail) starts;
  a [SEP] between documents that would start a row is dropped."""
  spans, p, n = [], 0, len(stream)
  while n - p >= width:
    spans.append((p, p + width))
    p += width
    if p < n and stream.boundary[p]:
      p += 1
  return spans, p


def cut_document(length: int, width: int) -> list[tuple[int, int]]:
  """Rows of one document: full ones, then the shorter rest."""
  return [(s, min(s + width, length)) for s in range(0, length, width)]


def assemble(stream: Stream, spans: list[tuple[int, int]], *, cls_id: int,
             sep_id: int) -> Assembled:
  """[CLS] text [SEP] rows of the stream's (start, end) ranges (width: the longest row)."""
  table = np.array(spans, np.int64).reshape(-1, 2)
  len_N = (table[:, 1] - table[:, 0]).astype(np.int32)
  lengths = len_N + 2
  L = int(lengths.max()) if len(lengths) else 2
  cols = np.arange(L)[None, :]
  inside = (cols >= 1) & (cols <= len_N[:, None])
  src = np.where(inside, table[:, :1] + cols - 1, 0)
  ids = np.where(inside, stream.ids[src] if len(stream) else 0, 0).astype(np.int32)
  ids[:, 0] = cls_id
  ids[np.arange(len(lengths)), lengths - 1] = sep_id
  continuation = None
  if stream.continuation is not None:
    continuation = np.where(inside, stream.continuation[src] if len(stream) else False, False)
  return Assembled(ids, lengths, len_N, row_records.maskable_single_segment(
      ids, lengths, cls_id, sep_id), continuation)


def _repeat(rows: Assembled, times: int) -> Assembled:
  return Assembled(*(None if x is None else np.repeat(x, times, axis=0) for x in rows))


def encode(stream: Stream, spans: list[tuple[int, int]], rng: np.random.Generator,
           params: dict, tok, pool: np.ndarray) -> tuple[list[bytes], int]:
  """(records, tokens written) of the rows `spans` of `stream`, dupe_factor copies each."""
  if not spans:
    return [], 0
  rows = _repeat(assemble(stream, spans, cls_id=tok.cls_id, sep_id=tok.sep_id),
                 params["dupe_factor"])
  return (row_records.to_records(rows, np.zeros(len(rows.lengths), np.int32), rng, params, tok,
                                 pool, single_segment=True), int(rows.lengths.sum()))


def chunk_records(chunk: Chunk, rng: np.random.Generator, params: dict, tok,
                  pool: np.ndarray) -> tuple[list[bytes], int, Stream | None]:
  """(records, tokens written, tail) of one chunk; the tail (FULL-SENTENCES) is None for
  DOC-SENTENCES."""
  width = params["max_seq_length"] - 2
  docs = document_streams(chunk)
  if params["doc_sentences"]:
    spans, offset = [], 0
    for doc in docs:
      spans += [(offset + s, offset + e) for s, e in cut_document(len(doc), width)]
      offset += len(doc)
    stream = Stream(chunk.ids, chunk.continuation, np.zeros(len(chunk.ids), bool))
    return (*encode(stream, spans, rng, params, tok, pool), None)
  stream = joined(docs, tok.sep_id)
  spans, tail_start = cut_full(stream, width)
  return (*encode(stream, spans, rng, params, tok, pool), stream.slice(tail_start))


class TailPacker:
  """The main process's packing of one split's chunk tails into full rows (module docstring)."""

  def __init__(self, params: dict, tok, pool: np.ndarray, split: str, split_code: int):
    self.params, self.tok, self.pool = params, tok, pool
    self.split, self.split_code = split, split_code
    self.width = params["max_seq_length"] - 2
    self.pending: Stream | None = None
    self.last_index = 0

  def _rng(self, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(
        [self.params["seed"], self.split_code, index, TAIL_STREAM]))

  def add(self, tail: Stream | None, index: int, result_type):
    """The full rows that chunk `index`'s tail completes, as a `result_type` (create.py's
    ChunkResult) of the chunk's split and index."""
    records, tokens = [], 0
    if tail is not None and len(tail):
      self.last_index = index
      stream = joined([self.pending, tail] if self.pending is not None else [tail],
                      self.tok.sep_id)
      spans, rest = cut_full(stream, self.width)
      self.pending = stream.slice(rest)
      records, tokens = encode(stream, spans, self._rng(index), self.params, self.tok,
                               self.pool)
    return result_type(self.split, index, 0, tokens, records, 0)

  def finish(self, index: int, result_type):
    """The split's last row (what is left, short of a full row; none if nothing is), as a
    `result_type` with index `index` (the shard it goes to, with --num-shards)."""
    stream, self.pending = self.pending, None
    records, tokens = [], 0
    if stream is not None and len(stream):
      records, tokens = encode(stream, [(0, len(stream))], self._rng(self.last_index + 1),
                               self.params, self.tok, self.pool)
    return result_type(self.split, index, 0, tokens, records, 0)
