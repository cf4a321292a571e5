"""TensorFlow 1 checkpoints (Google's BERT releases) read and written without TensorFlow.

A checkpoint `PREFIX` is `PREFIX.index`, a TF table (leveldb's SSTable: prefix-compressed
blocks, an index block, a 48-byte footer) whose key "" holds a BundleHeaderProto and whose
other keys are variable names holding BundleEntryProtos (dtype, shape, shard_id, offset, size,
masked crc32c), and `PREFIX.data-0000S-of-0000N`, the raw little-endian tensor bytes.
Only the few protobuf fields those messages use are decoded, by hand (no generated code).

Also the name mapping between google-research/bert's variables and transformers' keys
(`bert/encoder/layer_0/attention/self/query/kernel` ~ `bert.encoder.layer.0.attention.self.
query.weight`, transposed), so convert.py's HF mapping does the rest.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import struct

import numpy as np

from bert_jax.errors import UserError

_MAGIC = 0xDB4775248B80FB57
_FOOTER = 48
# tensorflow/core/framework/types.proto DataType -> numpy (strings are never model weights)
_DTYPES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8",
           9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 19: "float16",
           22: "uint32", 23: "uint64"}


class TF1FormatError(UserError):
  """A damaged or unsupported TF1 checkpoint (one line, exit 2 from a CLI)."""


# ----------------------------------------------------------------------------- crc32c, protobuf

def _crc32c(data: bytes) -> int:
  import google_crc32c
  return google_crc32c.value(bytes(data))


def masked_crc32c(data: bytes) -> int:
  crc = _crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise ValueError("truncated varint")
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7


def _put_varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b, n = n & 0x7F, n >> 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _fields(msg: bytes):
  """(field number, value) of a protobuf message: ints for varint/fixed, bytes for the rest."""
  pos = 0
  while pos < len(msg):
    tag, pos = _varint(msg, pos)
    wire = tag & 7
    if wire == 0:
      value, pos = _varint(msg, pos)
    elif wire == 1:
      value, pos = int.from_bytes(msg[pos:pos + 8], "little"), pos + 8
    elif wire == 2:
      n, pos = _varint(msg, pos)
      value, pos = msg[pos:pos + n], pos + n
    elif wire == 5:
      value, pos = int.from_bytes(msg[pos:pos + 4], "little"), pos + 4
    else:
      raise ValueError(f"protobuf wire type {wire}")
    if pos > len(msg):
      raise ValueError("truncated protobuf message")
    yield tag >> 3, value


def _field(number: int, value: int | bytes) -> bytes:
  if isinstance(value, bytes):
    return _put_varint(number << 3 | 2) + _put_varint(len(value)) + value
  return _put_varint(number << 3) + _put_varint(value)


@dataclasses.dataclass(frozen=True)
class Entry:
  dtype: int
  shape: tuple[int, ...]
  shard: int
  offset: int
  size: int
  crc: int | None
  sliced: bool


def _entry(msg: bytes) -> Entry:
  f = {"dtype": 0, "shape": (), "shard": 0, "offset": 0, "size": 0, "crc": None,
       "sliced": False}
  for number, value in _fields(msg):
    if number == 2:
      f["shape"] = tuple(next((v for n, v in _fields(dim) if n == 1), 0)
                         for n, dim in _fields(value) if n == 2)
    else:
      key = {1: "dtype", 3: "shard", 4: "offset", 5: "size", 6: "crc", 7: "sliced"}.get(number)
      if key:
        f[key] = True if key == "sliced" else value
  return Entry(**f)


def _entry_bytes(dtype: int, shape: tuple[int, ...], offset: int, data: bytes) -> bytes:
  """As TensorFlow writes it: fields in order, zeros (proto3 defaults) left out."""
  dims = b"".join(_field(2, _field(1, d) if d else b"") for d in shape)
  return (_field(1, dtype) + _field(2, dims) + (_field(4, offset) if offset else b"")
          + (_field(5, len(data)) if data else b"")
          + struct.pack("<BI", 6 << 3 | 5, masked_crc32c(data)))


# ----------------------------------------------------------------------------- the table

def _block(file: bytes, handle: bytes, where: str) -> list[tuple[bytes, bytes]]:
  offset, pos = _varint(handle, 0)
  size, _ = _varint(handle, pos)
  if offset + size + 5 > len(file):
    raise ValueError(f"{where} block runs past the end of the file")
  data, kind = file[offset:offset + size], file[offset + size]
  crc = int.from_bytes(file[offset + size + 1:offset + size + 5], "little")
  if masked_crc32c(data + bytes([kind])) != crc:
    raise ValueError(f"{where} block fails its crc32c check")
  if kind != 0:
    raise ValueError(f"{where} block is compressed (type {kind}); only uncompressed tables")
  restarts = int.from_bytes(data[-4:], "little")
  end, pos, key, out = len(data) - 4 - 4 * restarts, 0, b"", []
  while pos < end:
    shared, pos = _varint(data, pos)
    fresh, pos = _varint(data, pos)
    n, pos = _varint(data, pos)
    key = key[:shared] + data[pos:pos + fresh]
    out.append((key, data[pos + fresh:pos + fresh + n]))
    pos += fresh + n
  return out


def _block_bytes(entries: list[tuple[bytes, bytes]]) -> bytes:
  body = b"".join(_put_varint(0) + _put_varint(len(k)) + _put_varint(len(v)) + k + v
                  for k, v in entries)
  return body + struct.pack("<II", 0, 1)  # one restart point, at 0 (no key shares a prefix)


def read_index(index_path: str | os.PathLike) -> tuple[int, dict[str, Entry]]:
  """(number of data shards, {variable name: Entry}) of a `.index` file."""
  path = pathlib.Path(index_path)
  try:
    file = path.read_bytes()
  except OSError as e:
    raise TF1FormatError(f"{path}: cannot read ({e.strerror})") from None
  try:
    if len(file) < _FOOTER or int.from_bytes(file[-8:], "little") != _MAGIC:
      raise ValueError("no TF table footer (truncated, or not a .index file)")
    footer = file[-_FOOTER:]
    pos = 0
    for _ in range(2):                    # the metaindex handle (offset, size): unused
      _, pos = _varint(footer, pos)
    num_shards, entries = 1, {}
    for _, handle in _block(file, footer[pos:], "index"):
      for key, value in _block(file, handle, "data"):
        if key == b"":                    # the BundleHeaderProto
          header = dict(_fields(value))
          num_shards = header.get(1, 1)
          if header.get(2, 0) != 0:
            raise ValueError("big-endian tensors")
        else:
          entries[key.decode("utf-8")] = _entry(value)
  except ValueError as e:
    raise TF1FormatError(f"{path}: not a readable TF checkpoint index ({e})") from None
  return num_shards, entries


def read_tensors(prefix: str | os.PathLike, keep=lambda name: True) -> dict[str, np.ndarray]:
  """The variables of checkpoint `prefix` whose names pass `keep`, as numpy arrays, each checked
  against its size and crc32c."""
  import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy; a jax dependency)
  prefix = str(prefix)
  num_shards, entries = read_index(prefix + ".index")
  shards: dict[int, bytes] = {}
  out = {}
  for name, e in entries.items():
    if not keep(name):
      continue
    if e.sliced:
      raise TF1FormatError(f"{prefix}.index: variable {name} is saved in slices "
                           "(partitioned); not supported")
    if e.dtype not in _DTYPES:
      raise TF1FormatError(f"{prefix}.index: variable {name} has TF dtype {e.dtype}; "
                           "expected a numeric tensor")
    data_path = f"{prefix}.data-{e.shard:05d}-of-{num_shards:05d}"
    if e.shard not in shards:
      try:
        shards[e.shard] = pathlib.Path(data_path).read_bytes()
      except OSError as err:
        raise TF1FormatError(f"{data_path}: cannot read ({err.strerror}); the checkpoint's "
                             "data file is missing") from None
    data = shards[e.shard][e.offset:e.offset + e.size]
    if len(data) != e.size:
      raise TF1FormatError(f"{data_path}: ends at byte {len(shards[e.shard])}, before variable "
                           f"{name} (bytes {e.offset}..{e.offset + e.size}); truncated?")
    if e.crc is not None and masked_crc32c(data) != e.crc:
      raise TF1FormatError(f"{data_path}: variable {name} fails its crc32c check; damaged")
    dtype = np.dtype(_DTYPES[e.dtype]).newbyteorder("<")
    if int(np.prod(e.shape, dtype=np.int64)) * dtype.itemsize != e.size:
      raise TF1FormatError(f"{prefix}.index: variable {name} has {e.size} bytes for shape "
                           f"{e.shape}")
    out[name] = np.frombuffer(data, dtype).reshape(e.shape)
  return out


def write_tensors(prefix: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
  """A one-shard TF1 checkpoint (`prefix.index`, `prefix.data-00000-of-00001`) of float32 /
  int tensors, readable by tf.train.load_checkpoint."""
  codes = {np.dtype(v): k for k, v in _DTYPES.items() if v != "bfloat16"}
  data, entries, offset = [], [], 0
  for name in sorted(tensors):
    x = np.asarray(tensors[name])
    raw = x.astype(x.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
    entries.append((name.encode("utf-8"), _entry_bytes(codes[x.dtype], x.shape, offset, raw)))
    data.append(raw)
    offset += len(raw)
  header = _field(1, 1) + _field(3, _field(1, 1))  # num_shards 1, little-endian, version 1
  pathlib.Path(f"{prefix}.data-00000-of-00001").write_bytes(b"".join(data))
  out = bytearray()

  def block(entries) -> bytes:
    body = _block_bytes(entries)
    handle = _put_varint(len(out)) + _put_varint(len(body))
    out.extend(body + struct.pack("<BI", 0, masked_crc32c(body + b"\0")))
    return handle

  data_handle = block([(b"", header)] + entries)
  meta_handle = block([])
  index_handle = block([(entries[-1][0] if entries else b"", data_handle)])
  footer = meta_handle + index_handle
  out.extend(footer + b"\0" * (40 - len(footer)) + struct.pack("<Q", _MAGIC))
  pathlib.Path(f"{prefix}.index").write_bytes(bytes(out))


# ----------------------------------------------------------------------------- directories

def find_prefix(path: str | os.PathLike) -> str | None:
  """The checkpoint prefix of a TF1 directory (its `checkpoint` file's model_checkpoint_path,
  else its one `*.index`), or of a prefix given directly; None when there is none."""
  p = pathlib.Path(path)
  if pathlib.Path(str(p) + ".index").is_file() or p.suffix == ".index":
    return str(p.with_suffix("")) if p.suffix == ".index" else str(p)
  if not p.is_dir():
    return None
  state = p / "checkpoint"
  if state.is_file():
    m = re.search(r'^model_checkpoint_path:\s*"(.*)"', state.read_text(errors="replace"), re.M)
    if m:
      return str(p / pathlib.Path(m.group(1)).name)  # the directory may have moved
  indexes = sorted(p.glob("*.index"))
  return str(indexes[0].with_suffix("")) if len(indexes) == 1 else None


def is_tf1_dir(path: str | os.PathLike) -> bool:
  p = pathlib.Path(path)
  return (p / "bert_config.json").is_file() and find_prefix(p) is not None


def is_model_variable(name: str) -> bool:
  """bert/... and cls/..., not the optimizer's slots or global_step."""
  return (name.startswith(("bert/", "cls/"))
          and not name.endswith(("/adam_m", "/adam_v", "/Adam", "/Adam_1")))


# ----------------------------------------------------------------------------- TF <-> HF names

_TF_TO_HF_LEAF = {"kernel": "weight", "gamma": "weight", "beta": "bias"}
_TF_SPECIAL = {"cls/predictions/output_bias": "cls.predictions.bias",
               "cls/seq_relationship/output_weights": "cls.seq_relationship.weight",
               "cls/seq_relationship/output_bias": "cls.seq_relationship.bias"}


def tf_to_hf(name: str, x: np.ndarray) -> tuple[str, np.ndarray]:
  """A google-research/bert variable -> (transformers key, tensor in transformers' layout)."""
  if name in _TF_SPECIAL:
    return _TF_SPECIAL[name], x
  parts = name.split("/")
  parts = [f"layer.{p[len('layer_'):]}" if re.fullmatch(r"layer_\d+", p) else p for p in parts]
  if parts[-1].endswith("_embeddings"):
    return ".".join(parts + ["weight"]), x
  leaf = _TF_TO_HF_LEAF.get(parts[-1], parts[-1])
  return ".".join(parts[:-1] + [leaf]), (x.T if parts[-1] == "kernel" else x)


def hf_to_tf(key: str, x: np.ndarray) -> tuple[str, np.ndarray]:
  """The inverse of tf_to_hf, for to-tf."""
  for tf_name, hf_key in _TF_SPECIAL.items():
    if key == hf_key:
      return tf_name, x
  parts = [f"layer_{p}" if p.isdigit() else p for p in key.split(".")]
  parts = [p for i, p in enumerate(parts) if not (p == "layer" and i + 1 < len(parts)
                                                   and parts[i + 1].startswith("layer_"))]
  if parts[-2].endswith("_embeddings"):
    return "/".join(parts[:-1]), x
  if parts[-2] == "LayerNorm":
    return "/".join(parts[:-1] + [{"weight": "gamma", "bias": "beta"}[parts[-1]]]), x
  if parts[-1] == "weight":
    return "/".join(parts[:-1] + ["kernel"]), x.T
  return "/".join(parts), x
