"""EM/F1 equal independent re-implementations of the official SQuAD v1.1/v2.0 and CMRC 2018
formulas (written differently here), on real text with perturbed predictions."""

from __future__ import annotations

import difflib
import json
import random
import re

import pytest

from bert_jax.finetune.qa import QAExample, read_squad
from bert_jax.finetune.squad_eval import (cmrc2018_em_f1, cmrc_scores, cmrc_segments,
                                          detect_language, evaluate, squad_v1_em_f1,
                                          squad_v1_scores, squad_v2_em_f1, squad_v2_scores)

# -- independent SQuAD formulas --------------------------------------------------------------

_PUNCT_TABLE = {ord(c): None for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"}


def ref_normalize(s: str) -> str:
  words = s.lower().translate(_PUNCT_TABLE)
  words = re.sub(r"\b(?:the|an|a)\b", " ", words)
  return " ".join(w for w in re.split(r"\s+", words) if w)


def ref_f1_v1(pred: str, gold: str) -> float:
  p, g = ref_normalize(pred).split(), ref_normalize(gold).split()
  remaining = {}
  for w in g:
    remaining[w] = remaining.get(w, 0) + 1
  same = 0
  for w in p:
    if remaining.get(w, 0) > 0:
      remaining[w] -= 1
      same += 1
  return 0.0 if same == 0 else 2.0 * same / (len(p) + len(g))  # = 2PR/(P+R)


def ref_v1(preds: dict, gold: dict) -> tuple[float, float]:
  em = sum(max(float(ref_normalize(preds[q]) == ref_normalize(a)) for a in golds)
           for q, golds in gold.items() if q in preds)
  f1 = sum(max(ref_f1_v1(preds[q], a) for a in golds) for q, golds in gold.items() if q in preds)
  return 100 * em / len(gold), 100 * f1 / len(gold)


def ref_v2(preds: dict, gold: dict) -> tuple[float, float]:
  em = f1 = 0.0
  for q, golds in gold.items():
    golds = [a for a in golds if ref_normalize(a)] or [""]
    if q not in preds:
      continue
    p = ref_normalize(preds[q]).split()
    em += max(float(ref_normalize(preds[q]) == ref_normalize(a)) for a in golds)
    scores = []
    for a in golds:
      g = ref_normalize(a).split()
      scores.append(float(p == g) if not p or not g else ref_f1_v1(preds[q], a))
    f1 += max(scores)
  return 100 * em / len(gold), 100 * f1 / len(gold)


# -- independent CMRC 2018 formulas ----------------------------------------------------------

CMRC_PUNCT = set("-:_*^/\\~`+=，。：？！“”；’《》·、「」（）－～『』")  # "……" never matches a char


def ref_words(run: str) -> list[str]:
  """Penn Treebank tokens of a non-Chinese run, by peeling characters off whitespace words."""
  words = run.split()
  out = []
  for index, word in enumerate(words):
    # Punkt ends a sentence at a word ending in "." unless it is an initial, a number or an
    # abbreviation; the Treebank rules then split the sentence's final period.
    last = index == len(words) - 1 or (
        word.endswith(".") and not re.fullmatch(r"[^\W\d]\.|\d+\.", word)
        and word[:-1] not in {"mr", "mrs", "dr", "st", "e.g", "i.e", "u.s", "no", "vs"})
    head, tail = [], []
    while word and word[0] in "\"([{<":
      head.append("``" if word[0] == '"' else word[0])
      word = word[1:]
    while word and (word[-1] in ")]}>\"?!;%&@#$" or word[-1] == "," or
                    (word[-1] == "'" and len(word) > 1 and word[-2] != "'") or
                    (last and word[-1] == "." and len(word) > 1 and word[-2] != ".")):
      tail.insert(0, "''" if word[-1] == '"' else word[-1])
      word = word[:-1]
    pieces = re.split(r"([;@#$%&?!()\[\]{}<>\"]|,(?!\d))", word)
    pieces = ["''" if p == '"' else p for p in pieces if p]
    if pieces and re.fullmatch(r".+'s", pieces[-1]):
      pieces[-1:] = [pieces[-1][:-2], "'s"]
    out += head + pieces + tail
  return out


def ref_segments(text: str) -> list[str]:
  text = "".join(c for c in text.lower().strip() if c not in CMRC_PUNCT)
  segs = []
  for piece in re.findall(r"[\u4e00-\u9fa5]|[^\u4e00-\u9fa5]+", text):
    segs += [piece] if re.fullmatch(r"[\u4e00-\u9fa5]", piece) else ref_words(piece)
  return segs


def ref_cmrc_one(pred: str, golds: list[str]) -> tuple[float, float]:
  strip = lambda s: "".join(c for c in s.lower().strip() if c not in CMRC_PUNCT)
  em = float(any(strip(a) == strip(pred) for a in golds))
  f1 = 0.0
  for a in golds:
    g, p = ref_segments(a), ref_segments(pred)
    match = difflib.SequenceMatcher(None, g, p, autojunk=False).find_longest_match(
        0, len(g), 0, len(p))
    if match.size:
      f1 = max(f1, 2 * match.size / (len(g) + len(p)))
  return em, f1


# -- perturbations ---------------------------------------------------------------------------

def perturb(context: str, start: int, end: int, rng: random.Random) -> str:
  kind = rng.randrange(9)
  length = end - start
  if kind == 0:
    return context[start:end]
  if kind == 1:  # shifted span
    shift = rng.choice([-5, -2, -1, 1, 3, 8])
    return context[max(0, start + shift):max(0, end + shift)]
  if kind == 2:  # truncated
    return context[start:start + max(1, length // 2)]
  if kind == 3:  # extended
    return context[max(0, start - 4):end + 6]
  if kind == 4:
    return ""
  if kind == 5:  # case and outer punctuation / articles
    return "The " + context[start:end].upper() + "."
  if kind == 6:  # somewhere else entirely
    other = rng.randrange(max(1, len(context) - length))
    return context[other:other + length]
  if kind == 7:
    return "  " + context[start:end] + "  "
  return context[start:end] + "，" + context[end:end + 3]


# -- SQuAD tests -----------------------------------------------------------------------------

def _wikitext_examples(shared_data, n: int, rng: random.Random) -> list[QAExample]:
  """Real English sentences as contexts, random word spans as gold answers."""
  lines = (shared_data / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8")
  paragraphs = [l.strip() for l in lines.split("\n") if len(l.split()) > 30]
  examples = []
  for i, context in enumerate(paragraphs[:n]):
    words = list(re.finditer(r"\S+", context))
    a = rng.randrange(len(words) - 6)
    b = a + rng.randrange(1, 6)
    start, end = words[a].start(), words[b].end()
    answers = [{"text": context[start:end], "answer_start": start}]
    if i % 3 == 0:  # a second reference
      answers.append({"text": words[a].group(), "answer_start": words[a].start()})
    examples.append(QAExample(id=f"w{i}", question="?", context=context, answers=answers))
  return examples


def test_squad_v1_matches_independent_formulas(shared_data):
  rng = random.Random(0)
  examples = _wikitext_examples(shared_data, 300, rng)
  preds = {}
  for e in examples:
    a = e.answers[0]
    preds[e.id] = perturb(e.context, a["answer_start"], a["answer_start"] + len(a["text"]), rng)
  del preds[examples[5].id]  # a missing prediction counts as 0
  gold = {e.id: [a["text"] for a in e.answers] for e in examples}
  ours = squad_v1_em_f1(preds, examples)
  em, f1 = ref_v1(preds, gold)
  assert ours["total"] == 300
  assert ours["exact_match"] == pytest.approx(em, abs=1e-9)
  assert ours["f1"] == pytest.approx(f1, abs=1e-9)
  assert 5 < ours["exact_match"] < 95 and ours["exact_match"] < ours["f1"] < 100  # a real mix
  for e in examples[:60]:
    if e.id in preds:
      assert squad_v1_scores(preds[e.id], gold[e.id])[1] == pytest.approx(
          max(ref_f1_v1(preds[e.id], g) for g in gold[e.id]))
  assert evaluate(examples, preds, lang="auto") == ours


def test_squad_v1_known_values():
  assert squad_v1_scores("The  Cat!", ["a cat"]) == (1.0, 1.0)
  assert squad_v1_scores("cat sat", ["the cat"])[1] == pytest.approx(2 / 3)
  assert squad_v1_scores("cat cat", ["cat"])[1] == pytest.approx(2 * 0.5 * 1 / 1.5)
  assert squad_v1_scores("", ["cat"]) == (0.0, 0.0)
  assert squad_v1_scores("Paris, France", ["France", "paris france"]) == (1.0, 1.0)
  # Unicode punctuation is not ASCII punctuation: the official script keeps it.
  assert squad_v1_scores("«Paris»", ["Paris"]) == (0.0, 0.0)


def test_squad_v2_null_answers_and_matches_independent(shared_data):
  rng = random.Random(1)
  examples = _wikitext_examples(shared_data, 120, rng)
  for e in examples[::4]:
    e.answers, e.is_impossible = [], True
  preds = {}
  for i, e in enumerate(examples):
    if e.is_impossible:
      preds[e.id] = "" if i % 8 == 0 else e.context[:12]
    else:
      a = e.answers[0]
      preds[e.id] = perturb(e.context, a["answer_start"], a["answer_start"] + len(a["text"]), rng)
  gold = {e.id: [a["text"] for a in e.answers] for e in examples}
  ours = squad_v2_em_f1(preds, examples)
  em, f1 = ref_v2(preds, gold)
  assert ours["exact_match"] == pytest.approx(em, abs=1e-9)
  assert ours["f1"] == pytest.approx(f1, abs=1e-9)
  assert evaluate(examples, preds) == ours  # impossible questions select v2.0
  assert squad_v2_scores("", []) == (1.0, 1.0)
  assert squad_v2_scores("something", []) == (0.0, 0.0)
  assert squad_v2_scores("", ["Paris"]) == (0.0, 0.0)
  assert squad_v2_scores("the", ["a"]) == (1.0, 1.0)  # both normalise to no answer


# -- CMRC tests ------------------------------------------------------------------------------

def test_cmrc_matches_independent_formulas(shared_data):
  examples = read_squad(shared_data / "cmrc2018" / "cmrc2018_dev.json")[:400]
  rng = random.Random(2)
  preds = {}
  for e in examples:
    start, end = e.answer_char_span()
    preds[e.id] = perturb(e.context, start, end, rng)
  ours = cmrc2018_em_f1(preds, examples)
  em = f1 = 0.0
  for e in examples:
    golds = [a["text"] for a in e.answers]
    one = ref_cmrc_one(preds[e.id], golds)
    assert cmrc_scores(preds[e.id], golds) == pytest.approx(one), (preds[e.id], golds)
    em += one[0]
    f1 += one[1]
  assert ours["total"] == 400
  assert ours["exact_match"] == pytest.approx(100 * em / 400, abs=1e-9)
  assert ours["f1"] == pytest.approx(100 * f1 / 400, abs=1e-9)
  assert 5 < ours["exact_match"] < 95 and ours["exact_match"] < ours["f1"] < 100
  assert detect_language(examples) == "zh"
  assert evaluate(examples, preds) == ours


def test_cmrc_segmentation_on_every_reference_answer(shared_data):
  """Our Treebank stand-in agrees with the test's token-peeling one on all CMRC answers."""
  for name in ("cmrc2018_dev.json", "cmrc2018_trial.json"):
    for e in read_squad(shared_data / "cmrc2018" / name):
      for a in e.answers:
        assert cmrc_segments(a["text"]) == ref_segments(a["text"]), a["text"]


def test_cmrc_known_values():
  # punctuation in the list is removed; Han characters are single segments; Latin runs words
  assert cmrc_segments("光荣和ω-force公司") == ["光", "荣", "和", "ωforce", "公", "司"]
  assert cmrc_scores("光荣和ω-force公司", ["光荣和ω-force"]) == pytest.approx((0.0, 0.8))
  assert cmrc_scores("《战国无双3》。", ["战国无双3"]) == (1.0, 1.0)
  # longest COMMON RUN, not a bag: the same characters out of order score low
  assert cmrc_scores("无双战国", ["战国无双"])[1] == pytest.approx(0.5)
  assert cmrc_scores("", ["战国"]) == (0.0, 0.0)
  # best over references
  assert cmrc_scores("北京", ["上海", "北京市"]) == pytest.approx((0.0, 0.8))
  # the ellipsis is in the official list only as a two-character entry: never removed
  assert cmrc_scores("等等……", ["等等"])[0] == 0.0


def test_evaluate_accepts_squad_json(shared_data):
  path = shared_data / "cmrc2018" / "cmrc2018_trial.json"
  data = json.loads(path.read_text(encoding="utf-8"))
  examples = read_squad(path)
  preds = {e.id: e.answers[0]["text"][:-1] for e in examples}
  assert evaluate(data, preds, lang="zh") == evaluate(examples, preds)
  assert evaluate(examples, {})["exact_match"] == 0.0
  with pytest.raises(ValueError):
    evaluate(examples, preds, lang="fr")
