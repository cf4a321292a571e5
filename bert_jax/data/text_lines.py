"""Reading a text file as decoded lines: UTF-8 with bad bytes replaced and counted, refused
when they are too many (a binary file, another encoding), long lines in bounded pieces, `.gz`
decompressed on the fly. Nothing reads a whole file into memory."""

from __future__ import annotations

import dataclasses
import gzip
import warnings
from typing import IO, Iterator

from bert_jax.errors import UserError

READ_CHUNK_BYTES = 1 << 20
# A file with more replaced bytes than this share (and at least _MIN_REFUSED of them) is refused.
REPLACED_BYTES_LIMIT = 0.01
_MIN_REFUSED = 64
_REPLACED_FLAG = "--allow-replaced-bytes (pretrain: --config.data.allow_replaced_bytes=true)"


class CorpusWarning(UserWarning):
  """Something in the input was repaired (e.g. non-UTF-8 bytes replaced)."""


@dataclasses.dataclass
class CorpusStats:
  """Counters filled while documents stream out; pass one to `iter_documents(stats=...)`."""
  files: int = 0
  documents: int = 0
  sentences: int = 0
  characters: int = 0
  bytes: int = 0  # bytes read from files (after decompression)
  bad_bytes: int = 0  # non-UTF-8 bytes replaced with U+FFFD
  long_lines_split: int = 0  # lines/sentences over MAX_SENTENCE_CHARS that were split
  files_with_bad_bytes: list[str] = dataclasses.field(default_factory=list)


def decode(data: bytes) -> tuple[str, int]:
  """UTF-8 decode with U+FFFD for bad bytes; returns the text and the bad-byte count."""
  try:
    return data.decode("utf-8"), 0
  except UnicodeDecodeError:
    pass
  parts, bad, pos = [], 0, 0
  while True:
    try:
      parts.append(data[pos:].decode("utf-8"))
      return "".join(parts), bad
    except UnicodeDecodeError as e:
      parts += [data[pos:pos + e.start].decode("utf-8"), "\ufffd"]
      bad += e.end - e.start
      pos += e.end


def _incomplete_utf8_tail(data: bytes) -> int:
  """How many trailing bytes start a UTF-8 character that the chunk cut off."""
  for back in range(1, min(4, len(data)) + 1):
    byte = data[-back]
    if byte & 0xC0 != 0x80:  # a lead byte (or ASCII)
      need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
      return back if need > back else 0
  return 0


def _open_binary(path: str) -> IO[bytes]:
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_head(path: str, size: int) -> bytes:
  """The first `size` bytes of a file (decompressed), to sniff its format."""
  try:
    with _open_binary(path) as f:
      return f.read(size)
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise UserError(f"--input {path}: cannot read ({e})") from None


def _check_replaced(path: str, bad: int, read: int, whole: bool) -> None:
  if bad > max(_MIN_REFUSED, REPLACED_BYTES_LIMIT * read):
    where = f"its {read:,} bytes" if whole else f"the first {read:,} bytes"
    raise UserError(f"--input {path}: {bad:,} of {where} ({bad / read:.1%}) are not UTF-8: "
                    "binary or another encoding (convert it, e.g. iconv -f latin1 -t utf-8); "
                    f"to replace them with U+FFFD anyway pass {_REPLACED_FLAG}")


def iter_lines(path: str, stats: CorpusStats | None = None,
               allow_replaced_bytes: bool = False,
               piece_bytes: int = READ_CHUNK_BYTES) -> Iterator[str]:
  """Decoded lines of a file (newline removed), in pieces of at most ~`piece_bytes`. Refuses a
  file with more than REPLACED_BYTES_LIMIT non-UTF-8 bytes unless `allow_replaced_bytes`."""
  bad_total = read = 0
  checked_at = 0
  carry = b""
  first = True
  try:
    with _open_binary(path) as f:
      while True:
        chunk = f.readline(piece_bytes)
        read += len(chunk)
        if not chunk and not carry:
          break
        chunk = carry + chunk
        carry = b""
        if chunk.endswith(b"\n"):
          chunk = chunk[:-1]
        elif len(chunk) >= piece_bytes:  # a piece of a longer line
          cut = _incomplete_utf8_tail(chunk)
          if cut:
            chunk, carry = chunk[:-cut], chunk[-cut:]
        text, bad = decode(chunk)
        bad_total += bad
        if not allow_replaced_bytes and bad_total and read - checked_at >= READ_CHUNK_BYTES:
          _check_replaced(path, bad_total, read, whole=False)  # a binary file fails early
          checked_at = read
        if first:
          text = text.removeprefix("\ufeff")
          first = False
        yield text.removesuffix("\r")
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise UserError(f"--input {path}: cannot read ({e})") from None
  finally:
    if stats is not None:
      stats.bytes += read
    if stats is not None and bad_total:
      stats.bad_bytes += bad_total
      stats.files_with_bad_bytes.append(path)
  if bad_total:
    if not allow_replaced_bytes:
      _check_replaced(path, bad_total, read, whole=True)
    warnings.warn(f"{path}: {bad_total:,} byte(s) of {read:,} that are not UTF-8 replaced "
                  "with U+FFFD", CorpusWarning, stacklevel=2)
