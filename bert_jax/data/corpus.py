"""Streaming corpus readers: every source becomes documents, each a list of sentences.

Input specs (`iter_documents(inputs, ...)` takes one or a list):
  PATH              a file (`.gz` is decompressed on the fly)
  DIR               every regular file below it, recursively, sorted by path (hidden skipped)
  GLOB              e.g. `data/*.txt` or `data/**/*.gz`, sorted by path
  tfds:NAME[/CONFIG][:SPLIT]
                    a prepared TensorFlow Datasets dataset read with `tfds.data_source`
                    (array_record; TensorFlow is not needed); one record = one document, its
                    `text_field` split into paragraphs at newlines and then into sentences
  sample | sample:en | sample:zh
                    the small corpus shipped inside the package (`sample` is English)

JSON lines (a file named `*.jsonl` / `*.ndjson`, `.gz` too, or whose first line is a JSON
object): one JSON object a line, and `text_field` (--text-field) names the field that holds
the text; each line's text is then read as the format below says (a file's lines are the
field's lines: with `bert`, or `auto`, one sentence a line, and a blank line inside the field
ends a document as in BERT's format). Without `text_field` such a file is refused, naming the
flag: it is never read as plain text, JSON syntax included.

File formats (`input_format`):
  bert  one sentence per line, blank line between documents (google-research/bert's format)
  text  running text, split into sentences (English `.!?`, Chinese `。！？；`). If the file has
        WikiText article headings (` = Title = `) a document is an article, subsection
        headings (` = = Sub = = `) are dropped, and blank lines only end paragraphs;
        otherwise a blank line ends a document.
  auto  per file: `text` when the name (without `.gz`) ends in `.tokens` or `.raw` or the first
        64 KiB hold a WikiText article heading; `bert` otherwise.

WikiText marks rare words with the token `<unk>`; in WikiText files it becomes the literal
"[UNK]", which the tokenizer (like BertTokenizerFast) maps to the vocab's [UNK] id, instead of
the three pieces `<`, `unk`, `>`. Other text is left as it is, so ids stay BertTokenizerFast's.

Robustness: bytes that are not UTF-8 are replaced with U+FFFD and counted (`CorpusStats.
bad_bytes` of `CorpusStats.bytes`, plus a warning per file); a file where they are more than
REPLACED_BYTES_LIMIT of the bytes (a binary file, another encoding) is refused unless
`allow_replaced_bytes`; a line over 1 MiB is read in 1 MiB pieces; a "sentence"
over MAX_SENTENCE_CHARS is split at sentence ends, then at spaces or commas, so no single
string blows up memory or a tokenizer. Missing inputs, globs that match nothing and inputs
without any text raise UserError naming them. Nothing reads a whole file into memory.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import re
from typing import Iterable, Iterator

from bert_jax.data.sentences import bounded, split_sentences
from bert_jax.data.text_lines import CorpusStats, decode, iter_lines, read_head
from bert_jax.errors import UserError

FORMATS = ("auto", "bert", "text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_JSONL_LINE_BYTES = 256 << 20  # a JSON line is parsed whole: one document's bytes at most
_TEXT_FIELD_FLAG = "--text-field FIELD (pretrain: --config.data.text_field=FIELD)"
SAMPLE_LANGUAGES = ("en", "zh")
_SNIFF_BYTES = 64 << 10
_SAMPLE_DIR = pathlib.Path(__file__).resolve().parent / "sample"
_WIKITEXT_UNK = re.compile(r"(?<!\S)<unk>(?!\S)")



def sample_corpus_path(lang: str = "en") -> str:
  """Path of the embedded sample corpus (BERT format) for `lang` ("en" or "zh")."""
  if lang not in SAMPLE_LANGUAGES:
    raise UserError(f"sample corpus {lang!r}: unknown language; expected one of "
                    f"{', '.join(SAMPLE_LANGUAGES)}")
  return str(_SAMPLE_DIR / f"{lang}.txt")


# -- resolving input specs ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
  """One readable unit: a file, or a tfds dataset split."""
  kind: str  # "file" or "tfds"
  path: str  # file path, or the tfds name (with config)
  split: str = "train"
  spec: str = ""  # the user's spec it came from, for error messages


def _has_glob_chars(spec: str) -> bool:
  return any(c in spec for c in "*?[")


def _files_under(directory: str) -> list[str]:
  found = []
  for root, dirs, files in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found += [os.path.join(root, f) for f in files if not f.startswith(".")]
  return sorted(found)


def resolve_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike],
                   split: str = "train") -> list[Source]:
  """Expands input specs into sources, in order. Raises UserError for anything missing."""
  specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
  if not specs:
    raise UserError("--input: no input given (expected a file, directory, glob, tfds:NAME or sample)")
  sources: list[Source] = []
  for spec in map(os.fspath, specs):
    if spec.startswith("tfds:"):
      name, _, spec_split = spec[len("tfds:"):].partition(":")
      if not name:
        raise UserError(f"--input {spec}: expected tfds:NAME[/CONFIG][:SPLIT]")
      sources.append(Source("tfds", name, spec_split or split, spec))
    elif spec == "sample" or spec.startswith("sample:"):
      lang = spec.partition(":")[2] or "en"
      sources.append(Source("file", sample_corpus_path(lang), split, spec))
    elif os.path.isdir(spec):
      files = _files_under(spec)
      if not files:
        raise UserError(f"--input {spec}: directory holds no files")
      sources += [Source("file", f, split, spec) for f in files]
    elif os.path.isfile(spec):
      sources.append(Source("file", spec, split, spec))
    elif _has_glob_chars(spec):
      files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
      if not files:
        raise UserError(f"--input {spec}: pattern matches no files")
      sources += [Source("file", f, split, spec) for f in files]
    else:
      raise UserError(f"--input {spec}: no such file or directory")
  return sources


# -- formats ----------------------------------------------------------------------------

_TITLE = re.compile(r"^ ?= (?!=)(.*[^=])? = ?$")  # " = Title = "
_SUBHEADING = re.compile(r"^ ?(= ){2,}.*( =){2,} ?$")  # " = = Sub = = ", " = = = x = = = "


def _sniff_format(path: str) -> str:
  name = path.removesuffix(".gz")
  if name.endswith((".tokens", ".raw")):
    return "text"
  return "text" if _has_wikitext_titles(path) else "bert"


def _has_wikitext_titles(path: str) -> bool:
  head = read_head(path, _SNIFF_BYTES)
  text = head.decode("utf-8", errors="replace")
  return any(_TITLE.match(line.rstrip("\r")) for line in text.split("\n"))


def _bert_documents(lines: Iterable[str], stats: CorpusStats | None) -> Iterator[list[str]]:
  document: list[str] = []
  for line in lines:
    line = line.strip()
    if line:
      document.append(line)
    elif document:
      yield bounded(document, stats)
      document = []
  if document:
    yield bounded(document, stats)


def _text_documents(lines: Iterable[str], wikitext: bool,
                    stats: CorpusStats | None) -> Iterator[list[str]]:
  document: list[str] = []
  for line in lines:
    if wikitext:
      line = _WIKITEXT_UNK.sub("[UNK]", line)
    if wikitext and _TITLE.match(line):
      if document:
        yield document
      document = []
      continue
    if wikitext and _SUBHEADING.match(line):
      continue
    line = line.strip()
    if line:
      document += bounded(split_sentences(line), stats)
    elif document and not wikitext:
      yield document
      document = []
  if document:
    yield document


def _json_lines_fields(path: str) -> list[str] | None:
  """The field names of the first line when the file is JSON lines (by its name, or a first
  non-blank line that is a JSON object), else None."""
  head = read_head(path, _SNIFF_BYTES)
  lines = [line for line in head.decode("utf-8", errors="replace").split("\n") if line.strip()]
  first = lines[0].strip().removeprefix("\ufeff") if lines else ""
  try:
    record = json.loads(first) if first.startswith("{") else None
  except json.JSONDecodeError:
    record = None
  if isinstance(record, dict):
    return sorted(record)
  named = path.removesuffix(".gz").endswith(JSONL_SUFFIXES)
  cut_off = first.startswith('{"') and len(lines) == 1 and len(head) == _SNIFF_BYTES
  return [] if named or cut_off else None


def _refuse_json_lines(path: str, fields: list[str] | None) -> None:
  if fields is not None:
    shown = f" (fields of line 1: {', '.join(fields)})" if fields else ""
    raise UserError(f"--input {path}: looks like JSON lines{shown}; name the field that holds "
                    f"the text with {_TEXT_FIELD_FLAG}")


def _jsonl_documents(path: str, text_field: str, input_format: str,
                     stats: CorpusStats | None, allow_replaced_bytes: bool
                     ) -> Iterator[list[str]]:
  """Each line's `text_field`, read as a little file in `input_format` (bert for auto)."""
  lines = iter_lines(path, stats, allow_replaced_bytes, piece_bytes=_JSONL_LINE_BYTES)
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"--input {path}: line {number} is not valid JSON ({e.msg} at column "
                      f"{e.colno}); expected one JSON object a line") from None
    if not isinstance(record, dict) or text_field not in record:
      fields = ", ".join(sorted(record)) if isinstance(record, dict) else "not an object"
      raise UserError(f"--input {path}: line {number} has no field {text_field!r} "
                      f"(fields: {fields}); pick one with {_TEXT_FIELD_FLAG}")
    value = record[text_field]
    if value is None:
      continue
    if not isinstance(value, str):
      raise UserError(f"--input {path}: line {number}: field {text_field!r} is a "
                      f"{type(value).__name__}; expected a string")
    text_lines = value.split("\n")
    if input_format == "text":
      yield from _text_documents(text_lines, wikitext=False, stats=stats)
    else:
      yield from _bert_documents(text_lines, stats)


def _file_documents(path: str, input_format: str, stats: CorpusStats | None,
                    allow_replaced_bytes: bool = False, text_field: str | None = None
                    ) -> Iterator[list[str]]:
  fields = _json_lines_fields(path)
  if fields is not None and text_field:
    return _jsonl_documents(path, text_field, input_format, stats, allow_replaced_bytes)
  _refuse_json_lines(path, fields)
  fmt = _sniff_format(path) if input_format == "auto" else input_format
  lines = iter_lines(path, stats, allow_replaced_bytes)
  if fmt == "bert":
    return _bert_documents(lines, stats)
  return _text_documents(lines, wikitext=_has_wikitext_titles(path), stats=stats)


def _tfds_documents(source: Source, text_field: str,
                    stats: CorpusStats | None) -> Iterator[list[str]]:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise UserError(f"--input {source.spec}: tensorflow-datasets is not installed "
                    "(pip install 'bert-jax[tfds]')") from None
  try:
    data = tfds.data_source(source.path, split=source.split, download=False)
  except Exception as e:  # noqa: BLE001 - tfds raises many kinds; all mean "cannot open it"
    first_line = str(e).strip().split("\n", 1)[0]
    raise UserError(f"--input {source.spec}: tfds dataset {source.path!r} split {source.split!r} "
                    f"is not available here ({first_line}); prepare it with "
                    f"`tfds build {source.path} --file_format=array_record`") from None
  for index in range(len(data)):
    record = data[index]
    if text_field not in record:
      raise UserError(f"--input {source.spec}: record has no field {text_field!r} "
                      f"(fields: {', '.join(sorted(record))}); pick one with --text-field")
    value = record[text_field]
    if isinstance(value, bytes):
      value, bad = decode(value)
      if stats is not None:
        stats.bad_bytes += bad
    sentences = []
    for paragraph in str(value).split("\n"):
      sentences += bounded(split_sentences(paragraph), stats)
    if sentences:
      yield sentences


def iter_source_documents(source: Source, input_format: str = "auto",
                          text_field: str | None = None, stats: CorpusStats | None = None,
                          allow_replaced_bytes: bool = False) -> Iterator[list[str]]:
  """Documents of one resolved source (see `resolve_inputs`); lets callers shard by source.
  `text_field`: the field of JSON lines files (required for them) and of tfds records
  (default "text")."""
  if stats is not None:
    stats.files += 1
  if source.kind == "tfds":
    documents = _tfds_documents(source, text_field or "text", stats)
  else:
    documents = _file_documents(source.path, input_format, stats, allow_replaced_bytes,
                                text_field)
  for document in documents:
    if stats is not None:
      stats.documents += 1
      stats.sentences += len(document)
      stats.characters += sum(map(len, document))
    yield document


def iter_documents(inputs: str | os.PathLike | Iterable[str | os.PathLike],
                   input_format: str = "auto", text_field: str | None = None,
                   split: str = "train",
                   stats: CorpusStats | None = None,
                   allow_replaced_bytes: bool = False) -> Iterator[list[str]]:
  """Streams documents (lists of non-empty, stripped sentences) from every input in order.

  Missing inputs raise UserError at call time; an input spec that yields no text at all, or a
  file that is mostly not UTF-8 (unless `allow_replaced_bytes`), raises UserError when the
  stream reaches it.
  """
  if input_format not in FORMATS:
    raise UserError(f"--input-format {input_format!r}: expected one of {', '.join(FORMATS)}")
  sources = resolve_inputs(inputs, split=split)
  if not text_field:  # refuse JSON lines before any work
    for source in sources:
      if source.kind == "file":
        _refuse_json_lines(source.path, _json_lines_fields(source.path))
  return _stream(sources, input_format, text_field, stats, allow_replaced_bytes)


def _stream(sources: list[Source], input_format: str, text_field: str | None,
            stats: CorpusStats | None, allow_replaced_bytes: bool) -> Iterator[list[str]]:
  documents_per_spec: dict[str, int] = {}
  for source in sources:
    count = documents_per_spec.setdefault(source.spec, 0)
    for document in iter_source_documents(source, input_format, text_field, stats,
                                          allow_replaced_bytes):
      count += 1
      yield document
    documents_per_spec[source.spec] = count
  empty = [spec for spec, count in documents_per_spec.items() if count == 0]
  if empty:
    raise UserError(f"--input {empty[0]}: no text found (empty file or only blank lines)")

