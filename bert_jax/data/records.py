"""The on-disk format of create-data: array_record shards of compact instance records, and a
manifest.json written last (a directory without it is incomplete).

A record is a 8-byte little-endian header followed by raw arrays (no pickle):
  version u8 | flags u8 | len_a u16 | len_b u16 | num_predictions u16
  input_ids        [length]              u16 (i32 with FLAG_WIDE_IDS)
  masked positions [num_predictions]     u16
  masked ids       [num_predictions]     u16 / i32
  continuation     packbits([len_a + len_b + 3]) (only with FLAG_CONTINUATION: unmasked data
                   for dynamic whole-word masking)
A pair record ([CLS] A [SEP] B [SEP], the MLM + NSP objective) has length len_a + len_b + 3
and segment ids that follow from len_a: 0 for [CLS] A [SEP], 1 for B [SEP]. A single-segment
record (FLAG_SINGLE_SEGMENT: [CLS] text [SEP], the MLM-only objective's packed rows, whose text
may hold further [SEP]s between documents) has len_b 0 and length len_a + 2, segment 0
everywhere and no NSP label; records without the flag decode as before it existed.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
from typing import Iterator, Sequence

import numpy as np

from bert_jax.data import batch as batch_lib
from bert_jax.errors import UserError
from bert_jax.storage.fileio import as_path, is_remote

RECORD_VERSION = 1
FORMAT_NAME = "bert-jax-instances"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FLAG_WIDE_IDS = 1
FLAG_RANDOM_NEXT = 2
FLAG_CONTINUATION = 4
FLAG_SINGLE_SEGMENT = 8
_HEADER = struct.Struct("<BBHHH")
SHARD_RE = re.compile(r"^(train|eval)-(\d{5})-of-(\d{5})\.array_record$")
# array_record groups records for compression; a group of 1 keeps random access cheap for grain.
WRITER_OPTIONS = "group_size:1,snappy"


def encode_record(ids: np.ndarray, len_a: int, positions: np.ndarray, labels: np.ndarray,
                  is_random_next: int, continuation: np.ndarray | None, wide: bool,
                  single_segment: bool = False) -> bytes:
  """One instance as bytes; `ids` holds its real tokens (len_a + len_b + 3 of a pair,
  len_a + 2 of a single segment)."""
  dtype = np.int32 if wide else np.uint16
  flags = (FLAG_WIDE_IDS if wide else 0) | (FLAG_RANDOM_NEXT if is_random_next else 0)
  flags |= FLAG_SINGLE_SEGMENT if single_segment else 0
  tail = b""
  if continuation is not None:
    flags |= FLAG_CONTINUATION
    tail = np.packbits(continuation.astype(bool)).tobytes()
  len_b = len(ids) - len_a - (2 if single_segment else 3)
  return b"".join((_HEADER.pack(RECORD_VERSION, flags, len_a, len_b, len(positions)),
                   ids.astype(dtype).tobytes(), positions.astype(np.uint16).tobytes(),
                   labels.astype(dtype).tobytes(), tail))


def encode_records(ids_NL: np.ndarray, lengths: np.ndarray, len_a: np.ndarray,
                   positions_NP: np.ndarray, labels_NP: np.ndarray, counts: np.ndarray,
                   is_random_next: np.ndarray, single_segment: bool = False) -> list[bytes]:
  """encode_record for a batch of rows with 16-bit ids, without continuation flags: every
  field is a uint16, so the records are one masked selection of a [N, 4 + L + 2P] matrix."""
  N, L = ids_NL.shape
  P = positions_NP.shape[1]
  header = np.empty((N, 4), np.uint16)
  flags = np.where(is_random_next != 0, FLAG_RANDOM_NEXT, 0) | (
      FLAG_SINGLE_SEGMENT if single_segment else 0)
  header[:, 0] = RECORD_VERSION | (flags << 8)
  header[:, 1] = len_a
  header[:, 2] = lengths - len_a - (2 if single_segment else 3)
  header[:, 3] = counts
  table = np.concatenate([header, ids_NL.astype(np.uint16), positions_NP.astype(np.uint16),
                          labels_NP.astype(np.uint16)], axis=1)
  in_ids = np.arange(L)[None, :] < lengths[:, None]
  in_pred = np.arange(P)[None, :] < counts[:, None]
  keep = np.concatenate([np.ones((N, 4), bool), in_ids, in_pred, in_pred], axis=1)
  data = table[keep].tobytes()       # row-major: each record's fields, one after the other
  ends = (np.cumsum(4 + lengths + 2 * counts) * 2).tolist()
  starts = [0] + ends[:-1]
  return [data[a:b] for a, b in zip(starts, ends)]


def decode_record(data: bytes) -> dict[str, np.ndarray]:
  """The inverse of encode_record: unpadded int32 arrays (+ `continuation` bool if stored)."""
  version, flags, len_a, len_b, num_pred = _HEADER.unpack_from(data)
  if version != RECORD_VERSION:
    raise UserError(f"instance record version {version}: this bert-jax reads version {RECORD_VERSION}")
  dtype = np.dtype(np.int32 if flags & FLAG_WIDE_IDS else np.uint16)
  length = len_a + len_b + (2 if flags & FLAG_SINGLE_SEGMENT else 3)
  offset = _HEADER.size
  ids = np.frombuffer(data, dtype, length, offset)
  offset += length * dtype.itemsize
  positions = np.frombuffer(data, np.uint16, num_pred, offset)
  offset += num_pred * 2
  labels = np.frombuffer(data, dtype, num_pred, offset)
  offset += num_pred * dtype.itemsize
  segment_ids = np.zeros(length, np.int32)
  segment_ids[len_a + 2:] = 1         # none for a single segment (length len_a + 2)
  # `segment_ids` (a batch's token_type_ids) is the name read_instances' documented contract
  # gives (DESIGN.md, bert_jax.data.read_instances); every batch says token_type_ids (batch.py).
  out = {
      "input_ids": ids.astype(np.int32),
      "segment_ids": segment_ids,
      "masked_lm_positions": positions.astype(np.int32),
      "masked_lm_ids": labels.astype(np.int32),
      "next_sentence_label": np.int32(1 if flags & FLAG_RANDOM_NEXT else 0),
  }
  if flags & FLAG_CONTINUATION:
    bits = np.frombuffer(data, np.uint8, (length + 7) // 8, offset)
    out["continuation"] = np.unpackbits(bits, count=length).astype(bool)
  return out


def _gather(buf_u8: np.ndarray, offset_B: np.ndarray, width_B: np.ndarray, valid_BW: np.ndarray,
            fill: int) -> np.ndarray:
  """[B, W] int32: element j of row b is the little-endian integer of width_B[b] (2 or 4)
  bytes at offset_B[b] + j * width_B[b] of `buf_u8`; `fill` where not valid_BW."""
  W = valid_BW.shape[1]
  pos_BW = np.where(valid_BW, offset_B[:, None] + width_B[:, None] * np.arange(W), 0)
  out_BW = buf_u8[pos_BW].astype(np.int32) | (buf_u8[pos_BW + 1].astype(np.int32) << 8)
  if (width_B == 4).any():
    wide_BW = valid_BW & (width_B == 4)[:, None]
    high_at_BW = np.where(wide_BW, pos_BW, 0)   # a 16-bit row's last element may end the buffer
    high_BW = (buf_u8[high_at_BW + 2].astype(np.int32)
               | (buf_u8[high_at_BW + 3].astype(np.int32) << 8))
    out_BW = np.where(wide_BW, out_BW | (high_BW << 16), out_BW)
  out_BW[~valid_BW] = fill
  return out_BW


def decode_batch(data: Sequence[bytes], seq_len: int, max_predictions: int,
                 pad_id: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None]:
  """decode_record for a whole batch in a few numpy passes (the records are gathered from one
  joined buffer, no per-record Python), padded to the pipeline's fixed shapes.

  Returns (batch, len_a [B], continuation [B, seq_len] bool or None when no record has it;
  a single-segment row has len_a = its length - 2 and token_type_ids 0); batch is a
  `batch.PRETRAINING` batch of seq_len tokens and max_predictions slots: input_ids `pad_id`
  past the tokens, the masked_lm_* fields 0 past the record's predictions.
  """
  B, L, P = len(data), seq_len, max_predictions
  sizes_B = np.fromiter(map(len, data), np.int64, B)
  starts_B = np.cumsum(sizes_B) - sizes_B
  buf_u8 = np.frombuffer(b"".join(data), np.uint8)
  if (sizes_B < _HEADER.size).any():
    raise UserError(f"instance record of {int(sizes_B.min())} bytes: shorter than its header")
  head_B8 = buf_u8[starts_B[:, None] + np.arange(_HEADER.size)].astype(np.int64)
  version_B, flags_B = head_B8[:, 0], head_B8[:, 1]
  len_a_B, len_b_B, num_pred_B = (head_B8[:, 2 + 2 * i] | (head_B8[:, 3 + 2 * i] << 8)
                                  for i in range(3))
  if (version_B != RECORD_VERSION).any():
    bad = int(version_B[version_B != RECORD_VERSION][0])
    raise UserError(f"instance record version {bad}: this bert-jax reads version {RECORD_VERSION}")
  width_B = np.where(flags_B & FLAG_WIDE_IDS, 4, 2)
  length_B = len_a_B + len_b_B + np.where(flags_B & FLAG_SINGLE_SEGMENT, 2, 3)
  has_cont_B = (flags_B & FLAG_CONTINUATION) != 0
  cont_bytes_B = np.where(has_cont_B, (length_B + 7) // 8, 0)
  ids_at_B = starts_B + _HEADER.size
  pos_at_B = ids_at_B + length_B * width_B
  labels_at_B = pos_at_B + 2 * num_pred_B
  cont_at_B = labels_at_B + num_pred_B * width_B
  if (cont_at_B + cont_bytes_B != starts_B + sizes_B).any():
    raise UserError("instance record: its size does not match its header (a damaged shard)")
  if length_B.max() > L or num_pred_B.max() > P:
    raise UserError(f"instance record of {int(length_B.max())} tokens and "
                    f"{int(num_pred_B.max())} predictions: more than the batch's {L} and {P}")
  tokens_BL = np.arange(L)[None, :] < length_B[:, None]
  preds_BP = np.arange(P)[None, :] < num_pred_B[:, None]
  batch = batch_lib.pretraining_batch(dict(
      input_ids=_gather(buf_u8, ids_at_B, width_B, tokens_BL, pad_id),
      attention_mask=tokens_BL.astype(np.int32),
      token_type_ids=(tokens_BL & (np.arange(L)[None, :] >= len_a_B[:, None] + 2)).astype(np.int32),
      masked_lm_positions=_gather(buf_u8, pos_at_B, np.full(B, 2), preds_BP, 0),
      masked_lm_ids=_gather(buf_u8, labels_at_B, width_B, preds_BP, 0),
      masked_lm_weights=batch_lib.prediction_weights(num_pred_B, P),
      next_sentence_label=((flags_B & FLAG_RANDOM_NEXT) != 0).astype(np.int32)))
  continuation_BL = None
  if has_cont_B.any():
    cols_L = np.arange(L)
    valid_BL = tokens_BL & has_cont_B[:, None]
    byte_BL = buf_u8[np.where(valid_BL, cont_at_B[:, None] + cols_L // 8, 0)]
    continuation_BL = valid_BL & (((byte_BL >> (7 - cols_L % 8)) & 1) != 0)
  return batch, len_a_B.astype(np.int32), continuation_BL


class ShardReader:
  """Random access to the records of a list of shards by global key (shard after shard):
  one `read()` per shard and batch, no thread pool per call. Picklable (grain workers open
  their own readers). Local shards are read one record after another (array_record's
  random-access options); gs:// shards keep array_record's parallel reads, which hide the
  latency of each request."""

  def __init__(self, paths: Sequence[str]):
    from concurrent.futures import ThreadPoolExecutor
    self.paths = list(paths)
    with ThreadPoolExecutor(min(16, max(1, len(self.paths)))) as pool:  # gs://: opens overlap
      self._readers: list = list(pool.map(_open_reader, self.paths))
    self.ends = np.cumsum([r.num_records() for r in self._readers], dtype=np.int64)

  def __len__(self) -> int:
    return int(self.ends[-1]) if len(self.ends) else 0

  def __getstate__(self):
    return dict(self.__dict__, _readers=[None] * len(self.paths))

  def read(self, keys: np.ndarray) -> list[bytes]:
    shard_K = np.searchsorted(self.ends, keys, side="right")
    position_K = keys - np.where(shard_K > 0, self.ends[np.maximum(shard_K - 1, 0)], 0)
    if len(self.paths) == 1 or (shard_K == shard_K[0]).all():
      return self._reader(int(shard_K[0])).read(position_K.tolist())
    out: list[bytes] = [b""] * len(keys)
    for shard in np.unique(shard_K).tolist():
      where = np.flatnonzero(shard_K == shard)
      for i, data in zip(where.tolist(), self._reader(shard).read(position_K[where].tolist())):
        out[i] = data
    return out

  def _reader(self, shard: int):
    if self._readers[shard] is None:
      self._readers[shard] = _open_reader(self.paths[shard])
    return self._readers[shard]


def _open_reader(path: str):
  from array_record.python.array_record_module import ArrayRecordReader
  options = "readahead_buffer_size:0" + ("" if is_remote(path) else ",max_parallelism:0")
  return ArrayRecordReader(path, options=options, file_reader_buffer_size=32768)


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def read_manifest(data_dir: str | os.PathLike) -> dict:
  """manifest.json of a create-data directory (local or gs://, through etils.epath),
  validated; UserError names what is wrong."""
  data_dir = os.fspath(data_dir)
  directory = as_path(data_dir)
  if not directory.is_dir():
    raise UserError(f"data directory {data_dir}: not found (expected the --output of "
                    "`bert-jax create-data`)")
  path = directory / MANIFEST
  if not path.is_file():
    raise UserError(f"data directory {data_dir}: no {MANIFEST}, so it is incomplete or not "
                    "create-data output (re-run `bert-jax create-data`)")
  try:
    man = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a readable JSON manifest ({e})") from None
  if not isinstance(man, dict) or man.get("format") != FORMAT_NAME:
    raise UserError(f"{path}: field 'format' should be {FORMAT_NAME!r}")
  if man.get("format_version") != FORMAT_VERSION:
    raise UserError(f"{path}: field 'format_version' is {man.get('format_version')!r}; this "
                    f"bert-jax reads version {FORMAT_VERSION}")
  present = {p.name for p in directory.iterdir()}  # one listing, not a request per shard
  for split, info in man.get("splits", {}).items():
    for name in info.get("shards", []):
      if name not in present:
        raise UserError(f"{path}: split {split!r} lists shard {name}, which is missing")
  return man


def shard_paths(data_dir: str | os.PathLike, split: str = "train",
                man: dict | None = None) -> list[str]:
  """Absolute shard paths (or gs:// URIs) of one split, from the manifest (`man`, when the
  caller has read it already). array_record's reader opens gs:// shards itself (its own GCS
  client, application-default credentials)."""
  man = read_manifest(data_dir) if man is None else man
  if split not in man["splits"]:
    raise UserError(f"data directory {os.fspath(data_dir)}: no split {split!r} (it has "
                    f"{', '.join(sorted(man['splits'])) or 'none'})")
  return [str(as_path(data_dir) / name) for name in man["splits"][split]["shards"]]


def iter_shard(path: str) -> Iterator[bytes]:
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(path)
  try:
    total = reader.num_records()
    step = 1024
    for begin in range(0, total, step):
      yield from reader.read(begin, min(begin + step, total))
  finally:
    reader.close()


def read_instances(path: str | os.PathLike, split: str = "train") -> Iterator[dict[str, np.ndarray]]:
  """Instances of a create-data directory (one split, in shard order) or of one shard file."""
  path = os.fspath(path)
  if as_path(path).is_dir():
    paths = shard_paths(path, split)
  elif as_path(path).is_file():
    paths = [path]
  else:
    matches = sorted(glob.glob(path))
    if not matches:
      raise UserError(f"instances {path}: not found (expected a create-data directory or "
                      "an .array_record shard)")
    paths = matches
  for shard in paths:
    for data in iter_shard(shard):
      yield decode_record(data)
