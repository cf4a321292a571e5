"""Trains a BERT WordPiece vocab.txt with sentencepiece: `bert-jax train-vocab`.

Text is split exactly the way the tokenizer will split it (BERT normalizer: clean text, CJK
characters spaced out, optional lower-casing and accent stripping; then whitespace and
punctuation splitting), words are counted, and sentencepiece learns pieces from the word
counts (its TSV input), so no piece ever spans two words. Pieces are then renamed into
WordPiece form: a word-initial piece (`▁abc`) becomes `abc`, a word-internal one (`abc`)
becomes `##abc`.

The vocab.txt written holds, in this order:
  ids 0-4   [PAD] [UNK] [CLS] [SEP] [MASK]
  then      every character that covers `character_coverage` of the text or is seen at least
            MIN_CHAR_COUNT times, most frequent first, as a bare piece and as a `##` piece (so
            WordPiece never falls back to [UNK] on such a character); characters the tokenizer
            always splits off alone (CJK ideographs, punctuation) get no `##` form, since it
            could never be produced
  then      the remaining sentencepiece pieces by score, until `vocab_size` lines.
If the corpus is too small to fill `vocab_size`, fewer lines are written (with a warning).
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import random
import re
import sys
import tempfile
import warnings
from typing import Iterable, Iterator

from tokenizers import normalizers, pre_tokenizers

from bert_jax.data.corpus import iter_documents
from bert_jax.errors import UserError, cli_entry
from bert_jax.storage.fileio import check_writable, write_text_atomic
from bert_jax.tokenizer import CONTINUATION_PREFIX, MAX_INPUT_CHARS_PER_WORD, SPECIAL_TOKENS

MIN_VOCAB_SIZE = 64
MIN_CHAR_COUNT = 2  # a character seen this often is kept even beyond character_coverage
CHAR_SHARE = 0.9  # characters may take at most this share of the non-special slots
_SPM_WORD_START = "\u2581"  # sentencepiece's "▁"
# Literal special tokens in the text (WikiText's <unk> is read as "[UNK]"): not words to learn.
_SPECIAL_IN_TEXT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def _word_splitter(lower_case: bool):
  normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                          strip_accents=lower_case, lowercase=lower_case)
  pre_tokenizer = pre_tokenizers.BertPreTokenizer()

  def split(text: str) -> list[str]:
    return [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]

  return split


def _sample_sentences(documents: Iterable[list[str]], max_sentences: int,
                      seed: int) -> Iterator[str]:
  """All sentences when there are at most `max_sentences`; else a uniform sample (reservoir)."""
  rng = random.Random(seed)
  reservoir: list[str] = []
  seen = 0
  for document in documents:
    for sentence in document:
      if seen < max_sentences:
        reservoir.append(sentence)
      else:
        slot = rng.randrange(seen + 1)
        if slot < max_sentences:
          reservoir[slot] = sentence
      seen += 1
  return iter(reservoir)


def count_words(sentences: Iterable[str], lower_case: bool) -> collections.Counter:
  """Word counts after BERT normalisation and pre-tokenisation."""
  split = _word_splitter(lower_case)
  counts: collections.Counter = collections.Counter()
  for sentence in sentences:
    counts.update(split(_SPECIAL_IN_TEXT.sub(" ", sentence)))
  return counts


def covered_characters(word_counts: dict[str, int], coverage: float,
                       min_count: int = MIN_CHAR_COUNT) -> list[str]:
  """Characters that get their own pieces, most frequent first: the most frequent ones that
  together make up `coverage` of all character occurrences, plus any seen `min_count` times."""
  char_counts: collections.Counter = collections.Counter()
  for word, count in word_counts.items():
    for char in word:
      char_counts[char] += count
  total = sum(char_counts.values())
  kept, running = [], 0
  for char, count in sorted(char_counts.items(), key=lambda kv: (-kv[1], kv[0])):
    if kept and running >= coverage * total and count < min_count:
      break
    kept.append(char)
    running += count
  return kept


def _always_alone(char: str, split) -> bool:
  """True for characters BERT always splits off as one-character words (CJK, punctuation):
  their `##` form can never come out of the tokenizer, so it would waste a vocab slot."""
  return split("a" + char + "a") == ["a", char, "a"]


def _train_sentencepiece(word_counts: dict[str, int], vocab_size: int, coverage: float,
                         model_type: str) -> list[tuple[str, float]]:
  import sentencepiece as spm

  with tempfile.TemporaryDirectory(prefix="bert_jax_vocab_") as tmp:
    tsv = os.path.join(tmp, "words.tsv")
    with open(tsv, "w", encoding="utf-8") as f:
      for word, count in sorted(word_counts.items(), key=lambda kv: (-kv[1], kv[0])):
        f.write(f"{word}\t{count}\n")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=tsv, input_format="tsv", model_writer=model, model_type=model_type,
        vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=coverage,
        normalization_rule_name="identity", add_dummy_prefix=True, bos_id=-1, eos_id=-1,
        split_digits=False, max_sentencepiece_length=16, num_threads=os.cpu_count() or 1,
        minloglevel=2)
  processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
  pieces = []
  for index in range(processor.get_piece_size()):
    if processor.is_unknown(index) or processor.is_control(index):
      continue
    pieces.append((processor.id_to_piece(index), processor.get_score(index)))
  return pieces


def wordpiece_vocab(pieces: Iterable[tuple[str, float]], characters: list[str],
                    vocab_size: int, lower_case: bool = True) -> list[str]:
  """Assembles the vocab lines (see the module docstring) from sentencepiece pieces.

  Characters take at most CHAR_SHARE of the non-special slots (most frequent first), so a
  corpus with thousands of rare characters still leaves room for word pieces. (Chinese text
  needs little else: BERT splits every CJK character into a word of its own.)
  """
  vocab = list(SPECIAL_TOKENS)
  seen = set(vocab)

  def add(token: str, limit: int = vocab_size) -> None:
    if token and token != CONTINUATION_PREFIX and token not in seen and len(vocab) < limit:
      seen.add(token)
      vocab.append(token)

  split = _word_splitter(lower_case)
  char_limit = len(SPECIAL_TOKENS) + int(CHAR_SHARE * (vocab_size - len(SPECIAL_TOKENS)))
  for char in characters:
    add(char, char_limit)
    if not _always_alone(char, split):
      add(CONTINUATION_PREFIX + char, char_limit)
  for piece, _score in sorted(pieces, key=lambda p: -p[1]):  # stable: sentencepiece order on ties
    if piece.startswith(_SPM_WORD_START):
      add(piece[len(_SPM_WORD_START):])
    elif _SPM_WORD_START not in piece:
      add(CONTINUATION_PREFIX + piece)
  return vocab


def write_vocab(tokens: list[str], output: str) -> None:
  """Writes one token per line, atomically (temp file in the same folder, then rename)."""
  write_text_atomic(output, "".join(token + "\n" for token in tokens))


def _sentencepiece_advice(error: Exception, vocab_size: int, coverage: float) -> str:
  """sentencepiece's message in this command's terms (its flags are not ours)."""
  text = str(error)
  counts = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", text)
  if counts:
    return (f"it has {counts.group(2)} distinct characters to cover at --character-coverage "
            f"{coverage}, but --vocab-size {vocab_size} leaves {counts.group(1)} entries beside "
            "the special tokens; raise --vocab-size or lower --character-coverage")
  text = re.sub(r"^\w+: \S+\.cc\(\d+\) \[.*?\] ", "", text.strip().splitlines()[0])
  for theirs, ours in (("--character_coverage option", "--character-coverage"),
                       ("character_coverage", "--character-coverage"),
                       ("--vocab_size", "--vocab-size"), ("vocab_size", "--vocab-size")):
    text = text.replace(theirs, ours)
  return f"sentencepiece could not train on it ({text})"


def train_vocab(inputs: str | list[str], vocab_size: int, output: str, lower_case: bool = True,
                input_format: str = "auto", character_coverage: float = 0.9995,
                max_sentences: int = 2_000_000, seed: int = 0, text_field: str | None = None,
                model_type: str = "bpe", allow_replaced_bytes: bool = False) -> str:
  """Trains a WordPiece vocab.txt on `inputs` (corpus specs, see bert_jax.data.corpus).

  Reads at most `max_sentences` sentences (a uniform sample drawn with `seed` when the input
  has more). Returns `output`.
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise UserError(f"--vocab-size {vocab_size}: expected at least {MIN_VOCAB_SIZE}")
  if not 0.5 <= character_coverage <= 1.0:
    raise UserError(f"--character-coverage {character_coverage}: expected a value in [0.5, 1]")
  if max_sentences < 1:
    raise UserError(f"--max-sentences {max_sentences}: expected a positive number")
  if model_type not in ("bpe", "unigram"):
    raise UserError(f"--model-type {model_type!r}: expected bpe or unigram")
  check_writable(output, "--output", is_file=True)
  shown = ", ".join(map(str, [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs))
  documents = iter_documents(inputs, input_format=input_format, text_field=text_field,
                             allow_replaced_bytes=allow_replaced_bytes)
  word_counts = count_words(_sample_sentences(documents, max_sentences, seed), lower_case)
  # Words WordPiece will turn into [UNK] anyway teach sentencepiece nothing useful.
  word_counts = {w: c for w, c in word_counts.items() if len(w) <= MAX_INPUT_CHARS_PER_WORD}
  if not word_counts:
    raise UserError(f"--input {shown}: no words found to train a vocabulary on")
  characters = covered_characters(word_counts, character_coverage)
  budget = vocab_size - len(SPECIAL_TOKENS)
  try:
    pieces = _train_sentencepiece(word_counts, budget, character_coverage, model_type)
  except RuntimeError as e:
    raise UserError(f"--input {shown}: "
                    f"{_sentencepiece_advice(e, vocab_size, character_coverage)}") from None
  vocab = wordpiece_vocab(pieces, characters, vocab_size, lower_case)
  if len(vocab) < vocab_size:
    warnings.warn(f"{output}: the corpus only supports {len(vocab)} vocab entries "
                  f"(--vocab-size {vocab_size})", stacklevel=2)
  write_vocab(vocab, output)
  return output


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="bert-jax train-vocab",
      description="Train a BERT WordPiece vocab.txt with sentencepiece on text split the way "
                  "the BERT tokenizer splits it.")
  parser.add_argument("--input", action="append", required=True, metavar="SPEC",
                      help="file, directory, glob, tfds:NAME[/CONFIG][:SPLIT] or sample[:en|:zh];"
                           " repeat for several")
  parser.add_argument("--vocab-size", type=int, required=True, help="number of vocab.txt lines")
  parser.add_argument("--output", required=True, help="vocab.txt to write (atomically)")
  parser.add_argument("--lower-case", action=argparse.BooleanOptionalAction, default=True,
                      help="lower-case and strip accents (an uncased vocab; default) or not")
  parser.add_argument("--input-format", default="auto", choices=("auto", "bert", "text"))
  parser.add_argument("--text-field", default=None, help="the field holding the text: of each "
                      "line of a JSON lines input (required there), of a tfds record (default "
                      "text)")
  parser.add_argument("--character-coverage", type=float, default=0.9995,
                      help="fraction of character occurrences whose characters get their own "
                           "pieces (default 0.9995)")
  parser.add_argument("--max-sentences", type=int, default=2_000_000,
                      help="sample at most this many sentences (default 2,000,000)")
  parser.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--allow-replaced-bytes", action="store_true",
                      help="go on when over 1%% of a file's bytes are not UTF-8")
  return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  path = train_vocab(args.input, args.vocab_size, args.output, lower_case=args.lower_case,
                     input_format=args.input_format, character_coverage=args.character_coverage,
                     max_sentences=args.max_sentences, seed=args.seed,
                     text_field=args.text_field, model_type=args.model_type,
                     allow_replaced_bytes=args.allow_replaced_bytes)
  with open(path, encoding="utf-8") as f:
    size = sum(1 for _ in f)
  print(f"wrote {path}: {size} tokens ({'uncased' if args.lower_case else 'cased'})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
