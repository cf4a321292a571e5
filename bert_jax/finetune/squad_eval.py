"""Exact match and F1 for extractive QA, as the official evaluation scripts define them.

* SQuAD v1.1 (`squad_v1_em_f1`): answers normalised by lower-casing, removing ASCII
  punctuation, removing the articles a/an/the, collapsing whitespace; F1 over the bag of
  whitespace tokens; the best over the reference answers; averaged over ALL questions of the
  dataset (a question without a prediction scores 0); 0-100.
* SQuAD v2.0 (`squad_v2_em_f1`): as v1.1, but references that normalise to "" are dropped,
  a question without references (unanswerable) has the single reference "", and F1 is 1 when
  prediction and reference are both empty.
* CMRC 2018 (`cmrc2018_em_f1`): lower-case and strip; EM compares the strings with the
  CMRC punctuation list removed; F1 segments text into single CJK characters (U+4E00-U+9FA5)
  and word tokens for the runs between them, drops the punctuation list, and scores the
  LONGEST COMMON CONTIGUOUS run of segments (not a bag of tokens); best over the references.
  The official script word-tokenises the non-Chinese runs with nltk.word_tokenize (Punkt
  sentences + the Penn Treebank rules); `_treebank_words` below re-implements those rules
  without nltk (nltk needs a separate model download); they agree on what the runs inside
  CMRC answers hold: numbers, Latin words, brackets, commas, dots, %, quotes.

Our own extension for unanswerable questions in Chinese data (CMRC 2018 has none): EM = F1 = 1
when the prediction is empty after normalisation, else 0.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Callable, Iterable, Mapping, Sequence

from bert_jax.finetune.qa import QAExample, parse_squad

# -- SQuAD -----------------------------------------------------------------------------------

_ASCII_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
  """SQuAD normalisation: lower, drop punctuation, drop articles, single spaces."""
  text = "".join(c for c in text.lower() if c not in _ASCII_PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(prediction_tokens: list[str], reference_tokens: list[str]) -> float:
  shared = sum((collections.Counter(prediction_tokens)
                & collections.Counter(reference_tokens)).values())
  if shared == 0:
    return 0.0
  precision = shared / len(prediction_tokens)
  recall = shared / len(reference_tokens)
  return 2 * precision * recall / (precision + recall)


def squad_v1_scores(prediction: str, references: Sequence[str]) -> tuple[float, float]:
  """(EM, F1) of one prediction in [0, 1], best over references (v1.1 rules)."""
  norm_pred = normalize_answer(prediction)
  em = f1 = 0.0
  for reference in references:
    norm_ref = normalize_answer(reference)
    em = max(em, float(norm_pred == norm_ref))
    f1 = max(f1, _token_f1(norm_pred.split(), norm_ref.split()))
  return em, f1


def squad_v2_scores(prediction: str, references: Sequence[str]) -> tuple[float, float]:
  """(EM, F1) of one prediction in [0, 1] under the v2.0 rules (no-answer = "")."""
  references = [r for r in references if normalize_answer(r)] or [""]
  pred_tokens = normalize_answer(prediction).split() if prediction else []
  em = f1 = 0.0
  for reference in references:
    ref_tokens = normalize_answer(reference).split() if reference else []
    em = max(em, float(normalize_answer(prediction) == normalize_answer(reference)))
    if not ref_tokens or not pred_tokens:
      f1 = max(f1, float(ref_tokens == pred_tokens))
    else:
      f1 = max(f1, _token_f1(pred_tokens, ref_tokens))
  return em, f1


# -- CMRC 2018 -------------------------------------------------------------------------------

# The official list. "……" is one two-character entry, so it never equals a single character:
# an ellipsis is NOT removed (as in the official script, which compares character by character).
CMRC_PUNCTUATION = frozenset([
    "-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=",
    "，", "。", "：", "？", "！", "“", "”", "；", "’", "《", "》", "……", "·", "、",
    "「", "」", "（", "）", "－", "～", "『", "』"])
_CMRC_HAN = re.compile(r"[\u4e00-\u9fa5]")


def _treebank_sentence_words(sentence: str) -> list[str]:
  """Penn Treebank word rules (as nltk's word tokenizer applies them) on one sentence."""
  s = sentence
  # opening double quotes
  s = re.sub(r'^"', "``", s)
  s = re.sub(r"(``)", r" \1 ", s)
  s = re.sub(r'([ (\[{<])("|\'{2})', r"\1 `` ", s)
  # punctuation
  s = re.sub(r"([:,])([^\d])", r" \1 \2", s)
  s = re.sub(r"([:,])$", r" \1 ", s)
  s = re.sub(r"\.{2,}", r" \g<0> ", s)
  s = re.sub(r"[;@#$%&]", r" \g<0> ", s)
  s = re.sub(r'([^.])(\.)([\]\)}>"\']*)\s*$', r"\1 \2\3 ", s)
  s = re.sub(r"[?!]", r" \g<0> ", s)
  s = re.sub(r"([^'])' ", r"\1 ' ", s)
  # brackets and double dashes
  s = re.sub(r"[\]\[\(\)\{\}<>]", r" \g<0> ", s)
  s = re.sub(r"--", r" -- ", s)
  # closing quotes and clitics
  s = " " + s + " "
  s = re.sub(r"''", " '' ", s)
  s = re.sub(r'"', " '' ", s)
  s = re.sub(r"([^' ])('[sSmMdD]|') ", r"\1 \2 ", s)
  s = re.sub(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 ", s)
  return s.split()


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Common abbreviations Punkt's English model knows, after which it does not end a sentence.
_ABBREVIATIONS = frozenset("mr mrs ms dr prof st jr sr vs etc inc ltd co corp dept gen col "
                           "capt lt sgt rev fig no vol ed eds jan feb mar apr jun jul aug sep "
                           "sept oct nov dec e.g i.e u.s u.k a.m p.m".split())


def _treebank_words(text: str) -> list[str]:
  """nltk.word_tokenize stand-in: sentence split after . ! ? + space (except after a single
  letter or a number, which Punkt treats as an initial or ordinal), then Treebank rules."""
  words: list[str] = []
  pieces = _SENTENCE_END.split(text)
  sentence = ""
  for piece in pieces:
    sentence = f"{sentence} {piece}" if sentence else piece
    last = sentence.rsplit(None, 1)[-1] if sentence.strip() else ""
    if re.fullmatch(r"(\w|\d+)\.", last) or last[:-1] in _ABBREVIATIONS:
      continue  # an initial, a number or an abbreviation: Punkt does not end a sentence
    words.extend(_treebank_sentence_words(sentence))
    sentence = ""
  if sentence:
    words.extend(_treebank_sentence_words(sentence))
  return words


def cmrc_segments(text: str, remove_punctuation: bool = True) -> list[str]:
  """CMRC 2018 mixed segmentation: each Han character alone, other runs word-tokenised."""
  segments: list[str] = []
  run = ""
  for char in text.lower().strip():
    if remove_punctuation and char in CMRC_PUNCTUATION:
      continue
    if _CMRC_HAN.match(char) or char in CMRC_PUNCTUATION:
      if run:
        segments.extend(_treebank_words(run))
        run = ""
      segments.append(char)
    else:
      run += char
  if run:
    segments.extend(_treebank_words(run))
  return segments


def cmrc_strip_punctuation(text: str) -> str:
  return "".join(c for c in text.lower().strip() if c not in CMRC_PUNCTUATION)


def _longest_common_run(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest contiguous run shared by a and b (dynamic programming, O(|a||b|))."""
  best = 0
  previous = [0] * (len(b) + 1)
  for x in a:
    current = [0] * (len(b) + 1)
    for j, y in enumerate(b):
      if x == y:
        current[j + 1] = previous[j] + 1
        best = max(best, current[j + 1])
    previous = current
  return best


def cmrc_scores(prediction: str, references: Sequence[str]) -> tuple[float, float]:
  """(EM, F1) of one prediction in [0, 1] by the CMRC 2018 rules, best over references."""
  pred_segments = cmrc_segments(prediction)
  pred_stripped = cmrc_strip_punctuation(prediction)
  em = f1 = 0.0
  for reference in references:
    em = max(em, float(cmrc_strip_punctuation(reference) == pred_stripped))
    ref_segments = cmrc_segments(reference)
    common = _longest_common_run(ref_segments, pred_segments)
    if common:
      precision = common / len(pred_segments)
      recall = common / len(ref_segments)
      f1 = max(f1, 2 * precision * recall / (precision + recall))
  return em, f1


# -- datasets --------------------------------------------------------------------------------

def _as_examples(dataset: Any) -> list[QAExample]:
  if isinstance(dataset, Mapping):
    return parse_squad(dataset)
  return list(dataset)


def _average(predictions: Mapping[str, str], examples: Iterable[QAExample],
             score: Callable[[str, Sequence[str]], tuple[float, float]],
             unanswerable: Callable[[str], tuple[float, float]] | None = None) -> dict[str, Any]:
  em_sum = f1_sum = 0.0
  total = 0
  for example in examples:
    total += 1
    if example.id not in predictions:
      continue  # the official scripts count a missing prediction as 0
    prediction = str(predictions[example.id])
    references = [a["text"] for a in example.answers]
    if not references:  # unanswerable (v2.0), or unlabelled
      # v1.1 has nothing to match (the official v1.1 and CMRC scripts would crash here)
      em, f1 = unanswerable(prediction) if unanswerable else (0.0, 0.0)
    else:
      em, f1 = score(prediction, references)
    em_sum += em
    f1_sum += f1
  if total == 0:
    return {"exact_match": 0.0, "f1": 0.0, "total": 0}
  return {"exact_match": 100.0 * em_sum / total, "f1": 100.0 * f1_sum / total, "total": total}


def squad_v1_em_f1(predictions: Mapping[str, str], dataset_examples) -> dict[str, Any]:
  """SQuAD v1.1 EM/F1 (0-100) of {id: answer} over examples (or a SQuAD JSON object)."""
  return _average(predictions, _as_examples(dataset_examples), squad_v1_scores)


def squad_v2_em_f1(predictions: Mapping[str, str], dataset_examples) -> dict[str, Any]:
  """SQuAD v2.0 EM/F1 (0-100); a question without references has the single reference ""."""
  return _average(predictions, _as_examples(dataset_examples), squad_v2_scores,
                  unanswerable=lambda p: squad_v2_scores(p, []))


def _cmrc_unanswerable(prediction: str) -> tuple[float, float]:
  empty = float(not cmrc_strip_punctuation(prediction))
  return empty, empty


def cmrc2018_em_f1(predictions: Mapping[str, str], dataset_examples) -> dict[str, Any]:
  """CMRC 2018 EM/F1 (0-100) of {id: answer} over examples (or a SQuAD-layout JSON)."""
  examples = _as_examples(dataset_examples)
  return _average(predictions, examples, cmrc_scores, unanswerable=_cmrc_unanswerable)


def _is_cjk(char: str) -> bool:
  code = ord(char)
  return 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF


def detect_language(examples: Sequence[QAExample], sample: int = 200) -> str:
  """"zh" when most letters in the (first `sample`) contexts are CJK ideographs, else "en"."""
  cjk = letters = 0
  for example in examples[:sample]:
    for char in example.context:
      if char.isalnum():
        letters += 1
        cjk += _is_cjk(char)
  return "zh" if letters and cjk / letters > 0.5 else "en"


def evaluate(examples, predictions: Mapping[str, str], *, lang: str = "auto",
             version_2_with_negative: bool | None = None) -> dict[str, Any]:
  """{"exact_match", "f1" (0-100), "total"}: CMRC 2018 rules for "zh", SQuAD for "en" (v2.0
  when version_2_with_negative, or when None and some question is impossible; else v1.1);
  "auto" picks the language from the contexts."""
  examples = _as_examples(examples)
  if lang == "auto":
    lang = detect_language(examples)
  if lang == "zh":
    return cmrc2018_em_f1(predictions, examples)
  if lang != "en":
    raise ValueError(f"lang should be 'en', 'zh' or 'auto', got {lang!r}")
  if version_2_with_negative is None:
    version_2_with_negative = any(e.is_impossible for e in examples)
  if version_2_with_negative:
    return squad_v2_em_f1(predictions, examples)
  return squad_v1_em_f1(predictions, examples)
