"""Sentence splitting for running text (English `.!?` with abbreviations and initials kept,
Chinese `。！？；`), and a bound on a sentence's length so no single string blows up memory or a
tokenizer."""

from __future__ import annotations

import re
from typing import Iterable

from bert_jax.data.text_lines import CorpusStats

MAX_SENTENCE_CHARS = 1000

# An English end (.!? plus closing quotes/brackets) followed by space, or a Chinese end.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*\s+|[。！？；]+[”’」』）)]*\s*")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc e.g i.e cf no vol fig al approx inc ltd co corp "
    "jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k".split())
_SOFT_BREAK = re.compile(r"[\s,，、;:]")


def _is_false_end(text: str, start: int, end: int) -> bool:
  """True when the period at text[start] does not end a sentence (abbreviation, initial)."""
  if end < len(text) and text[end].islower():
    return True  # "approx. three", "e.g. the", '"Really?" she asked'
  if text[start] != ".":
    return False
  word = text[:start].rsplit(None, 1)[-1] if text[:start].strip() else ""
  return (len(word) == 1 and word.isupper()) or word.lower() in _ABBREVIATIONS


def split_sentences(text: str) -> list[str]:
  """Splits running text into sentences (English `.!?`, Chinese `。！？；`); never empty strings."""
  sentences, begin = [], 0
  for match in _SENTENCE_END.finditer(text):
    if _is_false_end(text, match.start(), match.end()):
      continue
    sentence = text[begin:match.end()].strip()
    if sentence:
      sentences.append(sentence)
    begin = match.end()
  tail = text[begin:].strip()
  if tail:
    sentences.append(tail)
  return sentences


def _chop(sentence: str, limit: int = MAX_SENTENCE_CHARS) -> list[str]:
  """Cuts an over-long sentence at spaces/commas near the limit (hard cut when there are none)."""
  pieces = []
  while len(sentence) > limit:
    cut = max((m.end() for m in _SOFT_BREAK.finditer(sentence, limit // 2, limit)), default=limit)
    head, sentence = sentence[:cut].strip(), sentence[cut:].strip()
    if head:
      pieces.append(head)
  if sentence:
    pieces.append(sentence)
  return pieces


def bounded(sentences: Iterable[str], stats: CorpusStats | None) -> list[str]:
  """The sentences, each over MAX_SENTENCE_CHARS split at sentence ends, then near the limit."""
  out = []
  for sentence in sentences:
    if len(sentence) <= MAX_SENTENCE_CHARS:
      out.append(sentence)
      continue
    if stats is not None:
      stats.long_lines_split += 1
    for part in split_sentences(sentence):
      out += _chop(part)
  return out
