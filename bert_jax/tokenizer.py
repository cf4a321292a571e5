"""BERT WordPiece over a vocab.txt, with token ids identical to transformers' BertTokenizerFast.

The backend is the Rust `tokenizers` package, configured the way BERT tokenises:
  normalizer: clean text (drop control chars, map whitespace to spaces), put spaces around
              CJK characters, lower-case and strip accents for uncased vocabularies;
  pre-tokenizer: split on whitespace and punctuation;
  model: greedy longest-match WordPiece, `##` continuations, [UNK] for words over 100 chars.
The special tokens are registered as special added tokens, as transformers does, so a literal
"[MASK]" in the text maps to the [MASK] id in both.

Also here: finding the vocabulary and casing of a checkpoint or Hugging Face directory
(`find_vocab`, `find_lower_case`), and writing transformers' tokenizer files beside a model
(`write_tokenizer_files`), so that pretraining, fine-tuning and conversion share them without
loading jax.

Vocabulary ids are line numbers. A token listed twice maps to its LATER line (as transformers
does: bert-base-chinese has 53 duplicates); `vocab_size` counts lines, so it is the size the
embedding table needs, and `convert_ids_to_tokens` works for every line.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import shutil
import tempfile
from typing import Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
from tokenizers.implementations import BertWordPieceTokenizer
from tokenizers.models import WordPiece

from bert_jax.errors import UserError
from bert_jax.storage.fileio import local_copy, scratch_dir, self_and_parents, write_json_atomic

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONTINUATION_PREFIX = "##"
MAX_INPUT_CHARS_PER_WORD = 100
# Uncased if fewer than this fraction of the vocab's cased-script entries hold an uppercase
# letter (bert-base-uncased: 2 of 27,929; bert-base-chinese, used uncased: 8 of 4,000;
# cased vocabularies: several percent, since A-Z and ##A-##Z alone are 52 entries).
_UPPERCASE_FRACTION_FOR_CASED = 0.01
# Code points the BertNormalizer always puts spaces around (its Chinese characters), limited to
# the ranges every tokenizers release agrees on (0.2x writes Extension E's start as 0x2B920):
# a range it does not isolate would be wrong here, one left out only slower.
_ISOLATED_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF))
_CHARS_PER_ROUND = 1 << 22  # encode_ragged takes texts in rounds of about this many characters
# Isolated characters whose token is their vocab entry (else [UNK]) without asking the backend:
# assigned by Unicode 3.1 (so no release's tables drop them as unassigned), no decomposition,
# no case. The compatibility ideographs (F900-FAFF) decompose, so they are left to the backend.
_PLAIN_RANGES = ((0x3400, 0x4DB5), (0x4E00, 0x9FA5), (0x20000, 0x2A6D6))
_CHAR_TABLE = _ISOLATED_RANGES[-1][1] + 1  # one-character pieces below this: keyed by code point
_JOINED_CHARS = 1 << 12  # the backend gets the distinct pieces in texts of about this size


@dataclasses.dataclass
class Ragged:
  """Tokens of many texts back to back: text i has ids[splits[i]:splits[i + 1]] and, when
  asked for, their [start, end) character offsets into text i (offsets [n, 2])."""
  ids: np.ndarray      # int32 [n]
  splits: np.ndarray   # int64 [texts + 1]
  offsets: np.ndarray | None = None  # int32 [n, 2]

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.splits)

  def __len__(self) -> int:
    return len(self.splits) - 1

  def lists(self) -> list[list[int]]:
    ids, cut = self.ids.tolist(), self.splits.tolist()
    return [ids[a:b] for a, b in zip(cut[:-1], cut[1:])]


def _in_ranges(code: np.ndarray, ranges) -> np.ndarray:
  inside = np.zeros(len(code), bool)
  for lo, hi in ranges:
    inside |= (code >= lo) & (code <= hi)
  return inside


def _pieces(texts: list[str]):
  """Cuts the joined texts where BERT's normalizer and pre-tokenizer always cut: around each
  isolated (Chinese) character and at each ASCII space. Nothing in the pipeline looks across
  such a cut (normalising is per character, canonical reordering stops at a starter, special
  tokens hold no space), so each piece tokenises alone as it does in its text.
  A one-character piece is named by its code point (a table, not a sort: O(n)), a longer one
  by its string. Returns (the distinct one-character pieces' code points, ascending; the
  distinct longer pieces; each piece's index into those two back to back; piece start in the
  joined text; text start offsets in the joined text)."""
  lengths = np.fromiter(map(len, texts), np.int64, len(texts))
  starts = np.cumsum(lengths) - lengths
  joined = "".join(texts)
  code = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), np.uint32)
  n = len(code)
  isolated = _in_ranges(code, _ISOLATED_RANGES)
  in_run = ~isolated & (code != 0x20)
  text_first = np.zeros(n + 1, bool)
  text_first[starts] = True
  text_first[n] = True
  run_start = in_run.copy()
  run_start[1:] &= ~in_run[:-1] | text_first[1:n]
  run_end = in_run.copy()
  run_end[:-1] &= ~in_run[1:] | text_first[1:n]
  run_lo, run_hi = np.flatnonzero(run_start), np.flatnonzero(run_end) + 1
  single = isolated.copy()
  one = (run_hi - run_lo == 1) & (code[run_lo] < _CHAR_TABLE)  # e.g. the "，" between 中文
  single[run_lo[one]] = True
  long_lo = run_lo[~one].tolist()
  runs = [joined[a:b] for a, b in zip(long_lo, run_hi[~one].tolist())]
  unique_runs = dict.fromkeys(runs)
  for index, run in enumerate(unique_runs):
    unique_runs[run] = index
  single_at = np.flatnonzero(single)
  single_code = code[single_at].astype(np.intp)
  seen = np.zeros(_CHAR_TABLE, np.int32)  # int32: the table's random reads stay in cache
  seen[single_code] = 1
  unique_chars = np.flatnonzero(seen)
  seen[unique_chars] = np.arange(len(unique_chars))
  piece_of = np.empty(n, np.int64)
  piece_of[single_at] = seen[single_code]
  piece_of[long_lo] = np.fromiter(map(unique_runs.__getitem__, runs), np.int64, len(runs))
  piece_of[long_lo] += len(unique_chars)
  at = np.flatnonzero(isolated | run_start)
  return unique_chars, list(unique_runs), piece_of[at], at, starts


def read_vocab_lines(vocab_path: str | os.PathLike) -> list[str]:
  """The vocab's tokens, one per line (id = line number); trailing whitespace trimmed."""
  path = os.fspath(vocab_path)
  if not os.path.isfile(path):
    raise UserError(f"vocab file {path}: not found (expected a vocab.txt, one token per line)")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise UserError(f"vocab file {path}: not UTF-8 ({e.reason} at byte {e.start})") from None
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()  # the final newline does not start another token
  # Trim like the Rust WordPiece file reader that transformers 5 uses (str.rstrip also
  # removes "\r", so a vocab with Windows line endings reads the same).
  return [line.rstrip() for line in lines]


def infer_lower_case(tokens: Iterable[str]) -> bool:
  """True when the vocab looks uncased: (almost) no uppercase letters in regular entries."""
  cased = upper = 0
  for token in tokens:
    if token.startswith("[") and token.endswith("]") or token.startswith("<") and token.endswith(">"):
      continue  # [PAD], [unused1], <S>: markers, not text
    if any(c.lower() != c.upper() for c in token):
      cased += 1
      if any(c.isupper() for c in token):
        upper += 1
  return cased == 0 or upper / cased < _UPPERCASE_FRACTION_FOR_CASED


class WordPieceTokenizer:
  """BERT WordPiece; see the module docstring. Build it with `load_tokenizer`."""

  def __init__(self, tokens: Sequence[str], lower_case: bool, vocab_path: str | None = None):
    self.vocab_path = vocab_path
    self.lower_case = bool(lower_case)
    self._id_to_token = list(tokens)
    # dict insertion keeps the first key position but the LAST value: the later line wins.
    self.vocab: dict[str, int] = {}
    for index, token in enumerate(self._id_to_token):
      self.vocab[token] = index
    where = vocab_path or "vocab"
    missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
    if missing:
      raise UserError(f"vocab file {where}: missing special token(s) {' '.join(missing)} "
                      f"(a BERT vocab needs {' '.join(SPECIAL_TOKENS)})")
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        self.vocab[t] for t in SPECIAL_TOKENS)
    self.continuation_mask = np.array(
        [t.startswith(CONTINUATION_PREFIX) and len(t) > len(CONTINUATION_PREFIX)
         for t in self._id_to_token], dtype=bool)
    self._tokenizer = self._build_backend()

  def _build_backend(self) -> Tokenizer:
    model = WordPiece(self.vocab, unk_token="[UNK]", continuing_subword_prefix=CONTINUATION_PREFIX,
                      max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=self.lower_case,
        lowercase=self.lower_case)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    return tokenizer

  # -- sizes and lookups -------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """Number of vocab lines: the word-embedding rows a model needs."""
    return len(self._id_to_token)

  def __len__(self) -> int:
    return self.vocab_size

  def is_continuation(self, token_id: int) -> bool:
    """True for a `##` piece (it continues the previous token's word)."""
    return bool(self.continuation_mask[token_id])

  def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
    return [self._id_to_token[int(i)] for i in ids]

  def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
    return [self.vocab.get(t, self.unk_id) for t in tokens]

  # -- encoding ----------------------------------------------------------------------------

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without [CLS]/[SEP]."""
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many texts at once, without [CLS]/[SEP]; see `encode_ragged`."""
    return self.encode_ragged(texts).lists()

  def encode_ragged(self, texts: Sequence[str], offsets: bool = False) -> Ragged:
    """Token ids of many texts (and character offsets, as `encode_with_offsets`), the same as
    encoding each alone, several times faster: the texts are cut into pieces that tokenise
    independently (see `_pieces`), and each distinct piece (a word, a Chinese character) is
    encoded once: a common Chinese character by a vocab lookup, the others by the Rust backend,
    thousands of pieces per text it encodes."""
    texts = list(texts)
    parts, size, start = [], 0, 0
    for end, text in enumerate(texts, 1):
      size += len(text)
      if size >= _CHARS_PER_ROUND or end == len(texts):
        parts.append(self._encode_round(texts[start:end], offsets))
        size, start = 0, end
    if not parts:
      return Ragged(np.zeros(0, np.int32), np.zeros(1, np.int64),
                    np.zeros((0, 2), np.int32) if offsets else None)
    cuts = [parts[0].splits] + [p.splits[1:] + base for p, base in zip(
        parts[1:], np.cumsum([p.splits[-1] for p in parts[:-1]]))]
    return Ragged(np.concatenate([p.ids for p in parts]), np.concatenate(cuts),
                  np.concatenate([p.offsets for p in parts]) if offsets else None)

  def _encode_round(self, texts: list[str], offsets: bool) -> Ragged:
    chars, runs, piece, at, text_start = _pieces(texts)
    count, flat_ids, flat_offsets = self._encode_pieces(chars, runs)
    first = np.cumsum(count) - count
    n = count[piece]
    before = np.cumsum(n) - n
    total = int(n.sum())
    gather = np.repeat(first[piece] - before, n) + np.arange(total)
    text_first = np.append(np.searchsorted(at, text_start), len(at))  # each text's first piece
    splits = np.append(before, total)[text_first]
    spans = None
    if offsets:
      text = np.repeat(np.arange(len(texts)), np.diff(text_first))
      shift = np.repeat((at - text_start[text]).astype(np.int32), n)
      spans = flat_offsets[gather] + shift[:, None]
    return Ragged(flat_ids[gather], splits, spans)

  def _encode_pieces(self, chars: np.ndarray, runs: list[str]):
    """(token count, ids, offsets into the piece) of each distinct piece, `chars` first. A
    character of _PLAIN_RANGES is looked up in the vocab; the others go to the backend."""
    plain = _in_ranges(chars, _PLAIN_RANGES)
    other = np.flatnonzero(~plain)
    rest_count, rest_ids, rest_offsets = self._encode_joined(
        [chr(c) for c in chars[other].tolist()] + runs)
    count = np.ones(len(chars) + len(runs), np.int64)
    rest = np.concatenate([other, np.arange(len(chars), len(count))])
    count[rest] = rest_count
    first = np.cumsum(count) - count
    ids = np.empty(int(count.sum()), np.int32)
    offsets = np.empty((len(ids), 2), np.int32)
    plain_at = first[:len(chars)][plain]
    vocab, unk = self.vocab, self.unk_id
    ids[plain_at] = np.fromiter((vocab.get(chr(c), unk) for c in chars[plain].tolist()),
                                np.int32, len(plain_at))
    offsets[plain_at] = (0, 1)
    rest_first = np.cumsum(rest_count) - rest_count
    dest = np.repeat(first[rest] - rest_first, rest_count) + np.arange(len(rest_ids))
    ids[dest] = rest_ids
    offsets[dest] = rest_offsets
    return count, ids, offsets

  def _encode_joined(self, strings: list[str]):
    """(token count, ids, offsets into the string) of each string. The backend gets them
    joined by spaces (a cut, as in `_pieces`), _JOINED_CHARS at a time: a call per string
    costs more than tokenising it."""
    size = np.fromiter(map(len, strings), np.int64, len(strings)) + 1  # with its space
    begin = np.cumsum(size) - size
    if not strings:
      return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros((0, 2), np.int32)
    bounds = np.unique(np.append(np.searchsorted(
        begin, np.arange(0, int(begin[-1]) + 1, _JOINED_CHARS)), len(strings))).tolist()
    encodings = self._tokenizer.encode_batch(
        [" ".join(strings[a:b]) for a, b in zip(bounds[:-1], bounds[1:])],
        add_special_tokens=False)
    n = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int32,
                      int(n.sum()))
    offsets = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(
        e.offsets for e in encodings)), np.int64, 2 * len(ids)).reshape(-1, 2)
    offsets += np.repeat(begin[bounds[:-1]], n)[:, None]  # into the strings back to back
    owner = np.searchsorted(begin, offsets[:, 0], side="right") - 1  # no token starts at a space
    offsets -= begin[owner][:, None]
    return np.bincount(owner, minlength=len(strings)), ids, offsets.astype(np.int32)

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and (start, end) character offsets into the original `text`.

    A `##` piece's span covers only its own characters; every piece of an [UNK] word spans
    the whole word.
    """
    encoding = self._tokenizer.encode(text, add_special_tokens=False)
    return encoding.ids, [tuple(o) for o in encoding.offsets]

  def tokenize(self, text: str) -> list[str]:
    """Word pieces of `text` as strings (for a duplicated vocab entry, its text)."""
    return self.convert_ids_to_tokens(self.encode(text))

  def decode(self, ids: Iterable[int]) -> str:
    """Joins pieces with spaces, gluing `##` pieces to the previous one; skips [PAD]."""
    words: list[str] = []
    for token_id in ids:
      token_id = int(token_id)
      if token_id == self.pad_id:
        continue
      token = self._id_to_token[token_id]
      if self.continuation_mask[token_id] and words:
        words[-1] += token[len(CONTINUATION_PREFIX):]
      else:
        words.append(token)
    return " ".join(words)

  def __repr__(self) -> str:
    return (f"WordPieceTokenizer(vocab_path={self.vocab_path!r}, vocab_size={self.vocab_size}, "
            f"lower_case={self.lower_case})")


def load_tokenizer(vocab_path: str | os.PathLike, lower_case: bool | None = None) -> WordPieceTokenizer:
  """Loads a BERT vocab.txt. `lower_case=None` infers casing from the vocab's entries."""
  tokens = read_vocab_lines(vocab_path)
  if lower_case is None:
    lower_case = infer_lower_case(tokens)
  return WordPieceTokenizer(tokens, lower_case=lower_case, vocab_path=os.fspath(vocab_path))


# ------------------------------------------------------------------ vocabularies of model dirs

def vocab_from_tokenizer_json(path: str | os.PathLike) -> list[str]:
  """The tokens of a WordPiece tokenizer.json, in id order."""
  with open(path, encoding="utf-8") as f:
    model = json.load(f).get("model", {})
  vocab = model.get("vocab")
  if model.get("type") != "WordPiece" or not isinstance(vocab, dict):
    raise UserError(f"{path}: expected a WordPiece tokenizer with a vocab")
  return [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def find_vocab(path: str | os.PathLike, levels: int = 2) -> str | None:
  """vocab.txt of a checkpoint, workdir or HF dir (in it or up to `levels` parents above;
  written from tokenizer.json if only that exists), as a local file (a gs:// one, or one
  written from tokenizer.json, in fileio.scratch_dir()); None when there is none."""
  for d in self_and_parents(path, levels):
    if (d / "vocab.txt").is_file():
      return local_copy(str(d / "vocab.txt"))
  for d in self_and_parents(path, levels):
    if (d / "tokenizer.json").is_file():
      tokens = vocab_from_tokenizer_json(local_copy(str(d / "tokenizer.json")))
      out = pathlib.Path(tempfile.mkdtemp(prefix="vocab-", dir=scratch_dir())) / "vocab.txt"
      out.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
      return str(out)
  return None


def find_lower_case(path: str | os.PathLike, vocab_path: str | None) -> bool | None:
  """do_lower_case from the tokenizer_config.json of `path` or its two parents, else inferred
  from the vocab; None with neither."""
  for d in self_and_parents(path, 2):
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
      value = json.loads(cfg.read_text(encoding="utf-8")).get("do_lower_case")
      if value is not None:
        return bool(value)
  if vocab_path is None:
    return None
  return load_tokenizer(vocab_path).lower_case


def write_tokenizer_files(out_dir: str | os.PathLike, vocab_path: str | os.PathLike,
                          lower_case: bool, model_max_length: int) -> None:
  """vocab.txt, tokenizer.json, special_tokens_map.json and tokenizer_config.json, as
  transformers' BertTokenizerFast.save_pretrained writes them, into `out_dir`."""
  out_dir = pathlib.Path(out_dir)
  tokens = pathlib.Path(vocab_path).read_text(encoding="utf-8").splitlines()
  absent = [t for t in SPECIAL_TOKENS if t not in tokens]
  if absent:
    raise UserError(f"{vocab_path}: special token(s) {', '.join(absent)} missing")
  shutil.copyfile(vocab_path, out_dir / "vocab.txt")
  BertWordPieceTokenizer(os.fspath(vocab_path), lowercase=lower_case,
                         strip_accents=None if lower_case else False
                         ).save(str(out_dir / "tokenizer.json"))
  special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
             "cls_token": "[CLS]", "mask_token": "[MASK]"}
  write_json_atomic(out_dir / "special_tokens_map.json", special)
  write_json_atomic(out_dir / "tokenizer_config.json", {
      "tokenizer_class": "BertTokenizer", "do_lower_case": lower_case,
      "tokenize_chinese_chars": True, "strip_accents": None,
      "model_max_length": model_max_length, "clean_up_tokenization_spaces": True, **special})
