"""QA reading, doc-stride windows on character offsets, and answer extraction, on real CMRC
2018 data (bert-base-chinese vocab) and hand-written English examples (MiniLM vocab)."""

from __future__ import annotations

import collections
import json
import unicodedata

import numpy as np
import pytest

from bert_jax.errors import UserError
from bert_jax.finetune import qa_windows
from bert_jax.finetune.qa import QAExample, featurize, parse_squad, postprocess, read_squad
from bert_jax.finetune.squad_eval import evaluate
from bert_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def zh_tok(shared_data):
  return load_tokenizer(shared_data / "vocab" / "bert-base-chinese-vocab.txt")


@pytest.fixture(scope="module")
def en_tok(minilm_dir):
  return load_tokenizer(minilm_dir / "vocab.txt")


@pytest.fixture(scope="module")
def cmrc_dev(shared_data):
  return read_squad(shared_data / "cmrc2018" / "cmrc2018_dev.json")


def gold_token_span(features, row, char_start, char_end):
  """Token positions in `row` covering the gold characters, from the row's offsets alone; None
  when the row does not hold the whole answer."""
  chars = features.token_to_char[row]
  context = chars[:, 0] >= 0
  covering = np.nonzero(context & (chars[:, 0] < char_end) & (chars[:, 1] > char_start))[0]
  if not len(covering):
    return None
  # the whole answer must be inside this window
  window_chars = chars[context]
  if window_chars[:, 0].min() > char_start or window_chars[:, 1].max() < char_end:
    return None
  return int(covering[0]), int(covering[-1])


def perfect_logits(examples, features):
  start = np.full(features.input_ids.shape, -5.0, np.float32)
  end = start.copy()
  for row, example_index in enumerate(features.example_index):
    span = examples[example_index].answer_char_span()
    found = gold_token_span(features, row, *span) if span else None
    if found:
      start[row, found[0]] = end[row, found[1]] = 10.0
  return start, end


# -- windows and offsets ---------------------------------------------------------------------

def test_perfect_logits_give_100_on_cmrc_including_later_windows(cmrc_dev, zh_tok):
  examples = cmrc_dev[:300]
  features = featurize(examples, zh_tok, max_seq_length=128, doc_stride=64, is_training=True)
  start, end = perfect_logits(examples, features)

  # Which examples a window can answer: it holds the whole answer and gives its first token
  # the most context (the original BERT rule). Long answers straddling windows cannot be.
  answerable, later_window = set(), set()
  for row, example_index in enumerate(features.example_index):
    s = int(np.argmax(start[row]))
    if start[row, s] > 0 and features.token_is_max_context[row, s]:
      answerable.add(int(example_index))
      first_row = np.nonzero(features.example_index == example_index)[0][0]
      if row > first_row:
        later_window.add(int(example_index))
      # the featurizer's training labels are the same positions
      assert features.start_positions[row] == s
      assert features.end_positions[row] == int(np.argmax(end[row]))
  assert len(answerable) >= 0.95 * len(examples)
  assert len(later_window) >= 50  # answers only in the 2nd or a later window are common

  predictions = postprocess(examples, features, start, end, max_answer_length=128)
  subset = [e for i, e in enumerate(examples) if i in answerable]
  for e in subset:
    s, t = e.answer_char_span()
    assert predictions[e.id] == e.context[s:t]
  scores = evaluate(subset, predictions, lang="zh")
  assert scores == {"exact_match": 100.0, "f1": 100.0, "total": len(subset)}
  later = [e for i, e in enumerate(examples) if i in later_window]
  assert evaluate(later, predictions, lang="zh")["exact_match"] == 100.0


def test_windows_match_transformers_overflow(cmrc_dev, zh_tok, shared_data):
  """Same [CLS] q [SEP] window [SEP] ids as BertTokenizerFast with overflowing tokens (its
  `stride` is the overlap, ours the step: overlap = window length - doc_stride)."""
  transformers = pytest.importorskip("transformers")
  hf = transformers.BertTokenizerFast(
      vocab=str(shared_data / "vocab" / "bert-base-chinese-vocab.txt"), do_lower_case=True)
  examples = cmrc_dev[:40]
  features = featurize(examples, zh_tok, max_seq_length=128, doc_stride=64, is_training=False)
  for i, e in enumerate(examples):
    n_query = len(zh_tok.encode(e.question))
    window = 128 - n_query - 3
    enc = hf(e.question, e.context, max_length=128, truncation="only_second",
             stride=window - 64, return_overflowing_tokens=True, padding="max_length")
    rows = np.nonzero(features.example_index == i)[0]
    assert len(rows) == len(enc["input_ids"])
    for row, ids, types, mask in zip(rows, enc["input_ids"], enc["token_type_ids"],
                                     enc["attention_mask"]):
      assert features.input_ids[row].tolist() == ids
      assert features.token_type_ids[row].tolist() == types
      assert features.attention_mask[row].tolist() == mask


def test_each_context_token_has_one_max_context_window(cmrc_dev, zh_tok):
  examples = cmrc_dev[:60]
  features = featurize(examples, zh_tok, max_seq_length=96, doc_stride=32, is_training=False)
  for i, e in enumerate(examples):
    rows = np.nonzero(features.example_index == i)[0]
    owned = collections.Counter()
    for row in rows:
      chars = features.token_to_char[row]
      for pos in np.nonzero(features.token_is_max_context[row])[0]:
        assert chars[pos, 0] >= 0  # only context tokens
        owned[tuple(chars[pos].tolist())] += 1
    _, offsets = zh_tok.encode_with_offsets(e.context)
    # every context token is owned by exactly one window
    assert owned == collections.Counter(tuple(o) for o in offsets)


def _owned_by_comparing_windows(n_doc, max_doc, doc_stride):
  """run_squad's max-context rule the long way: every window scores every token it holds,
  min(left, right context) + 0.01 x its length (x 100, in integers), ties to the earlier."""
  _, start, length = qa_windows.windows(np.array([n_doc]), np.array([max_doc]), doc_stride)
  token = np.arange(n_doc)
  rank = np.full((len(start), n_doc), np.iinfo(np.int64).min)
  for w, (s, n) in enumerate(zip(start.tolist(), length.tolist())):
    inside = (token >= s) & (token < s + n)
    score = 100 * np.minimum(token - s, s + n - 1 - token) + n
    rank[w, inside] = (score * (len(start) + 1) - w)[inside]
  return rank.argmax(axis=0) if n_doc else np.zeros(0, int)


def test_max_context_spans_equal_comparing_every_window():
  """The closed form (nearest centre, the last window's suffix by bisection) against the long
  way, for many windowings at once: small ones exhaustively, long ones (where the 0.01 x
  length term outweighs a token of context) at random."""
  rng = np.random.default_rng(0)
  cases = [(n, m, s) for n in range(0, 25) for m in range(1, 11) for s in range(1, 13)]
  cases += [(int(rng.integers(0, 1500)), int(rng.integers(1, 400)), int(rng.integers(1, 200)))
            for _ in range(200)]
  n_doc, max_doc, strides = (np.array(c) for c in zip(*cases))
  for doc_stride in (4, 128):  # one stride for all, as featurize has; max_doc differs
    example, start, length = qa_windows.windows(n_doc, max_doc, doc_stride)
    lo, hi = qa_windows.max_context_spans(n_doc, max_doc, doc_stride, example, start)
    for index, (n, m, _) in enumerate(cases):
      rows = np.flatnonzero(example == index)
      best = _owned_by_comparing_windows(n, m, doc_stride)
      token = np.arange(n)
      for w, row in enumerate(rows):
        assert start[row] <= lo[row] or lo[row] >= hi[row]
        assert hi[row] <= start[row] + length[row]
        np.testing.assert_array_equal((token >= lo[row]) & (token < hi[row]), best == w,
                                      err_msg=f"n_doc {n}, max_doc {m}, stride {doc_stride}")
  # and the strides of the cases themselves, one windowing at a time
  for n, m, doc_stride in cases[::5]:
    example, start, _ = qa_windows.windows(np.array([n]), np.array([m]), doc_stride)
    lo, hi = qa_windows.max_context_spans(np.array([n]), np.array([m]), doc_stride, example,
                                          start)
    best = _owned_by_comparing_windows(n, m, doc_stride)
    for w in range(len(start)):
      np.testing.assert_array_equal((np.arange(n) >= lo[w]) & (np.arange(n) < hi[w]),
                                    best == w)


@pytest.mark.parametrize("shuffled", [False, True])
def test_answer_tokens_equal_checking_every_token(cmrc_dev, zh_tok, shuffled):
  """Two binary searches over all contexts' tokens (offsets that do not ascend: one example
  at a time) against testing every token for overlap."""
  contexts = list(dict.fromkeys(e.context for e in cmrc_dev[:300]))
  docs = zh_tok.encode_ragged(contexts, offsets=True)
  rng = np.random.default_rng(1)
  if shuffled:
    docs.offsets = docs.offsets[rng.permutation(len(docs.offsets))]
  context_of = rng.integers(0, len(contexts), 3000)
  size = np.array([len(contexts[c]) for c in context_of])
  start = (rng.random(3000) * (size + 4)).astype(int) - 2
  spans = np.stack([start, start + rng.integers(0, 6, 3000)], axis=1)
  spans[::10] = -1                                            # no answer
  spans[1::10] = (size[1::10] + np.array([[5], [9]])).T       # past the end
  first, last = qa_windows.answer_tokens(spans, docs, context_of)
  for i, c in enumerate(context_of):
    offsets = docs.offsets[docs.splits[c]:docs.splits[c + 1]]
    hit = np.flatnonzero((offsets[:, 0] < spans[i, 1]) & (offsets[:, 1] > spans[i, 0]))
    expected = (hit[0], hit[-1]) if spans[i, 0] >= 0 and len(hit) else (-1, -1)
    assert (first[i], last[i]) == expected, (i, spans[i])
  assert (first >= 0).sum() > 1000


def test_offsets_map_to_exact_original_text_english(en_tok):
  context = ("Café Society was founded by René LACOSTE in Paris, in 1933. Its motto: "
             "« Naïveté is strength »; THE Señor's crêpes cost $3.50.")
  ex = QAExample(id="e1", question="Who founded Café Society?", context=context, answers=[])
  features = featurize([ex], en_tok, max_seq_length=32, doc_stride=8, is_training=False)
  assert len(features) >= 3
  ids = features.input_ids
  for row in range(len(features)):
    for pos in np.nonzero(features.context_mask[row])[0]:
      s, t = features.token_to_char[row, pos]
      piece = en_tok.convert_ids_to_tokens([ids[row, pos]])[0].removeprefix("##")
      # uncased vocab: the piece is the original text lower-cased with accents stripped
      text = unicodedata.normalize("NFD", context[s:t].lower())
      assert "".join(c for c in text if unicodedata.category(c) != "Mn") == piece
  # a span answer comes back as the original characters (case, accents, spacing)
  for answer in ("René LACOSTE", "« Naïveté is strength »", "THE Señor's crêpes", "$3.50"):
    a = context.index(answer)
    ex_a = QAExample(id="e1", question=ex.question, context=context,
                     answers=[{"text": answer, "answer_start": a}])
    start, end = perfect_logits([ex_a], features)
    assert postprocess([ex_a], features, start, end)["e1"] == answer


def test_offsets_map_to_exact_original_text_chinese(zh_tok):
  context = "《战国无双３》（Samurai Warriors 3）是由光荣和ω－Ｆｏｒｃｅ开发，于２０１０年发售。"
  for answer in ("《战国无双３》", "（Samurai Warriors 3）", "光荣和ω－Ｆｏｒｃｅ", "２０１０年"):
    ex = QAExample(id="z", question="是什么？", context=context,
                   answers=[{"text": answer, "answer_start": context.index(answer)}])
    features = featurize([ex], zh_tok, max_seq_length=24, doc_stride=6, is_training=True)
    start, end = perfect_logits([ex], features)
    assert postprocess([ex], features, start, end)["z"] == answer


# -- post-processing rules -------------------------------------------------------------------

def _english_example():
  context = ("The Amazon river flows through Brazil, Peru and Colombia. It is about "
             "6,400 kilometres long and carries more water than any other river.")
  return QAExample(id="q", question="How long is the Amazon?", context=context, answers=[])


def _row_positions(features, row, text, context):
  s = context.index(text)
  return gold_token_span(features, row, s, s + len(text))


def test_max_answer_length_and_n_best(en_tok):
  ex = _english_example()
  features = featurize([ex], en_tok, max_seq_length=64, doc_stride=32, is_training=False)
  assert len(features) == 1
  long_s, long_e = _row_positions(features, 0, "Brazil, Peru and Colombia", ex.context)
  short_s, short_e = _row_positions(features, 0, "6,400 kilometres", ex.context)
  start = np.zeros((1, 64), np.float32)
  end = np.zeros((1, 64), np.float32)
  start[0, long_s], end[0, long_e] = 9.0, 9.0
  start[0, short_s], end[0, short_e] = 5.0, 5.0
  n_long = long_e - long_s + 1
  assert postprocess([ex], features, start, end)["q"] == "Brazil, Peru and Colombia"
  got = postprocess([ex], features, start, end, max_answer_length=n_long - 1)["q"]
  assert got != "Brazil, Peru and Colombia"
  assert len(en_tok.encode(got)) <= n_long - 1

  # n_best: only the n best starts/ends are tried; the best LEGAL start is 3rd by score here
  start[0, 0], start[0, 1] = 20.0, 19.0  # [CLS] and a question token: never legal
  assert postprocess([ex], features, start, end, n_best=2)["q"] == ""
  assert postprocess([ex], features, start, end, n_best=3)["q"] == "Brazil, Peru and Colombia"

  rng = np.random.default_rng(0)
  start, end = rng.normal(size=(2, 1, 64)).astype(np.float32)
  start[~features.context_mask] = end[~features.context_mask] = -10.0
  preds, nbest, odds = postprocess([ex], features, start, end, n_best=20, return_nbest=True)
  texts = [c["text"] for c in nbest["q"]]
  assert len(texts) == 20 and len(set(texts)) == 20 and texts[0] == preds["q"]
  scores = [c["start_logit"] + c["end_logit"] for c in nbest["q"]]
  assert scores == sorted(scores, reverse=True)
  _, nbest3, _ = postprocess([ex], features, start, end, n_best=3, return_nbest=True)
  assert len(nbest3["q"]) <= 3
  probs = [c["probability"] for c in nbest["q"]]
  assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0)
  for c in nbest["q"]:
    assert c["text"] in ex.context


def test_version_2_null_threshold(en_tok):
  ex = _english_example()
  features = featurize([ex], en_tok, max_seq_length=32, doc_stride=12, is_training=False)
  assert len(features) >= 2
  start = np.zeros(features.input_ids.shape, np.float32)
  end = start.copy()
  rows = [r for r in range(len(features))
          if _row_positions(features, r, "6,400 kilometres", ex.context)]
  row = next(r for r in rows if features.token_is_max_context[
      r, _row_positions(features, r, "6,400 kilometres", ex.context)[0]])
  s, e = _row_positions(features, row, "6,400 kilometres", ex.context)
  start[row, s], end[row, e] = 4.0, 3.0  # span score 7
  start[:, 0], end[:, 0] = 5.0, 4.0  # null score 9 ...
  start[row ^ 1, 0] = 4.5  # ... except one window's 8.5: the null score is the MIN, 8.5
  _, _, odds = postprocess([ex], features, start, end, version_2_with_negative=True,
                           return_nbest=True)
  assert odds["q"] == pytest.approx(8.5 - 7.0)
  v2 = lambda threshold: postprocess([ex], features, start, end, version_2_with_negative=True,
                                     null_score_diff_threshold=threshold)["q"]
  assert v2(0.0) == ""
  assert v2(1.49) == ""
  assert v2(1.51) == "6,400 kilometres"
  assert postprocess([ex], features, start, end)["q"] == "6,400 kilometres"  # v1: never ""
  _, nbest, _ = postprocess([ex], features, start, end, version_2_with_negative=True,
                            return_nbest=True)
  assert "" in [c["text"] for c in nbest["q"]]


def test_training_labels_for_impossible_and_missing_window(en_tok):
  ex = _english_example()
  answer = "carries more water"
  labelled = QAExample(id="a", question=ex.question, context=ex.context,
                       answers=[{"text": answer, "answer_start": ex.context.index(answer)}])
  impossible = QAExample(id="b", question=ex.question, context=ex.context, answers=[],
                         is_impossible=True)
  features = featurize([labelled, impossible], en_tok, max_seq_length=40, doc_stride=16,
                       is_training=True)
  for row, example_index in enumerate(features.example_index):
    s, t = features.start_positions[row], features.end_positions[row]
    if example_index == 1:
      assert s == t == 0
    elif s:
      a, b = features.token_to_char[row, s, 0], features.token_to_char[row, t, 1]
      assert ex.context[a:b] == answer
    else:
      assert _row_positions(features, row, answer, ex.context) is None
  assert (features.start_positions[features.example_index == 0] > 0).any()
  assert features.input_ids.dtype == np.int32 and features.attention_mask.dtype == np.int32
  with pytest.raises(UserError, match="'q'.*no room.*--max-seq-length 9"):
    featurize([ex], en_tok, max_seq_length=9, is_training=False)


# -- reading ---------------------------------------------------------------------------------

def _write(tmp_path, qas, context="Paris is the capital of France.", name="d.json"):
  path = tmp_path / name
  path.write_text(json.dumps({"version": "1.1", "data": [
      {"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}), encoding="utf-8")
  return path


def test_read_real_cmrc_files(shared_data, cmrc_dev):
  assert len(cmrc_dev) == 3219
  trial = read_squad(shared_data / "cmrc2018" / "cmrc2018_trial.json")
  assert len(trial) == 1002
  for e in cmrc_dev + trial:
    for a in e.answers:
      if a["answer_start"] >= 0:
        assert e.context[a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"]
  # TRIAL_210_QUERY_0 states answer_start 14, the text is at 13: corrected, not an error
  fixed = next(e for e in trial if e.id == "TRIAL_210_QUERY_0")
  assert fixed.answers[0]["answer_start"] == 13
  # CMRC dev's reference-only answers (start -1, text not in the context) are kept
  reference_only = [a for e in cmrc_dev for a in e.answers if a["answer_start"] == -1]
  assert len(reference_only) == 193
  assert all(e.answer_char_span() for e in cmrc_dev)


def test_bad_answer_start_names_file_and_id(tmp_path):
  path = _write(tmp_path, [{"id": "Q7", "question": "Capital?",
                            "answers": [{"text": "Paris", "answer_start": 0}]}],
                context="France is a country. " + "x" * 60 + " Paris is the capital of France.")
  with pytest.raises(UserError, match=r"d\.json.*'Q7'.*not at answer_start 0"):
    read_squad(path)
  path = _write(tmp_path, [{"id": "Q8", "question": "Capital?",
                            "answers": [{"text": "Berlin", "answer_start": 0}]}])
  with pytest.raises(UserError, match=r"d\.json.*'Q8'.*does not occur"):
    read_squad(path)
  # off by a couple of characters: moved to the nearest occurrence
  path = _write(tmp_path, [{"id": "Q9", "question": "Capital?",
                            "answers": [{"text": "France", "answer_start": 22}]}])
  assert read_squad(path)[0].answers[0]["answer_start"] == 24


@pytest.mark.parametrize("qa, field", [
    ({"id": "Q1", "answers": []}, "question"),
    ({"id": "Q1", "question": "?"}, "answers"),
    ({"id": "Q1", "question": "?", "answers": [{"text": "Paris"}]}, "answer_start"),
    ({"id": "Q1", "question": "?", "answers": [{"answer_start": 0}]}, "text"),
    ({"id": "Q1", "question": "?", "answers": [{"text": "Paris", "answer_start": "0"}]},
     "answer_start"),
])
def test_missing_fields_name_file_id_and_field(tmp_path, qa, field):
  with pytest.raises(UserError, match=rf"d\.json.*'Q1'.*'{field}'"):
    read_squad(_write(tmp_path, [qa]))


def test_bad_files(tmp_path, en_tok):
  empty = tmp_path / "empty.json"
  empty.write_text("\n")
  with pytest.raises(UserError, match=r"empty\.json.*empty"):
    read_squad(empty)
  broken = tmp_path / "broken.json"
  broken.write_text('{"data": [')
  with pytest.raises(UserError, match=r"broken\.json.*not JSON"):
    read_squad(broken)
  with pytest.raises(UserError, match=r"none\.json.*no questions"):
    read_squad(_write(tmp_path, [], name="none.json"))
  with pytest.raises(UserError, match=r"missing\.json.*not found"):
    read_squad(tmp_path / "missing.json")
  with pytest.raises(UserError, match="'context'"):
    parse_squad({"data": [{"paragraphs": [{"qas": []}]}]}, "x.json")
  ok = read_squad(_write(tmp_path, [{"id": "I", "question": "?", "is_impossible": True}]))
  assert ok[0].is_impossible and ok[0].answers == []
  dup = [{"id": "D", "question": "?", "answers": []}] * 2
  with pytest.raises(UserError, match=r"'D'.*duplicate"):
    read_squad(_write(tmp_path, dup))
  # a question whose answers have no position cannot be a training target
  ref_only = _write(tmp_path, [{"id": "R", "question": "?",
                                "answers": [{"text": "Lyon", "answer_start": -1}]}])
  examples = read_squad(ref_only)
  featurize(examples, en_tok, max_seq_length=32, is_training=False)  # fine for prediction
  with pytest.raises(UserError, match=r"d\.json.*'R'"):
    featurize(examples, en_tok, max_seq_length=32, max_query_length=8, is_training=True)


@pytest.mark.parametrize("is_training,length,stride", [(True, 128, 32), (False, 64, 16)])
def test_features_of_many_examples_are_those_of_each_alone(cmrc_dev, zh_tok, is_training,
                                                           length, stride):
  """featurize tokenises each distinct context once, all in one batch, and fills the rows with
  numpy: every example still gets the rows it gets alone."""
  examples = cmrc_dev[:200]
  kw = dict(max_seq_length=length, doc_stride=stride, is_training=is_training)
  together = featurize(examples, zh_tok, **kw)
  alone = [featurize([e], zh_tok, **kw) for e in examples]
  assert len(together) > len(examples) and len({e.context for e in examples}) < len(examples)
  for key in ("input_ids", "token_type_ids", "attention_mask", "start_positions",
              "end_positions", "token_to_char", "token_is_max_context", "answer_lengths"):
    expected = np.concatenate([getattr(f, key) for f in alone])
    assert getattr(together, key).dtype == expected.dtype
    np.testing.assert_array_equal(getattr(together, key), expected, err_msg=key)
  np.testing.assert_array_equal(together.example_index, np.concatenate(
      [np.full(len(f), i) for i, f in enumerate(alone)]))
  assert together.answers_in_no_window == sum(f.answers_in_no_window for f in alone)


def test_limits_that_cut_gold_answers_are_counted(cmrc_dev, zh_tok, en_tok):
  """On CMRC 2018, SQuAD's 30-token answer limit cuts gold answers (Chinese counts a token per
  character): say how many, and how many fit in no window."""
  from bert_jax.finetune.qa import coverage_warnings
  features = featurize(cmrc_dev, zh_tok, max_seq_length=384, doc_stride=128, is_training=False)
  lengths = features.answer_lengths
  assert len(lengths) == len(cmrc_dev)            # every dev question has a located answer
  longer = int((lengths > 30).sum())
  assert 0.01 < longer / len(lengths) < 0.1
  notes = coverage_warnings(features, "dev.json", max_answer_length=30, max_seq_length=384,
                            doc_stride=128)
  assert notes[0].startswith(f"dev.json: {longer} of {len(lengths)} gold answers "
                             f"({longer / len(lengths):.1%}) are longer than "
                             "--max-answer-length 30 tokens")
  assert coverage_warnings(features, "dev.json", max_answer_length=int(lengths.max()),
                           max_seq_length=384, doc_stride=128) == []
  # A window too small for the answer: it fits in none (trains as no-answer, never predicted).
  ex = _english_example()
  answer = ex.context[ex.context.index("carries"):]
  long_answer = QAExample(id="a", question=ex.question, context=ex.context,
                          answers=[{"text": answer, "answer_start": ex.context.index(answer)}])
  features = featurize([long_answer], en_tok, max_seq_length=16, doc_stride=4, is_training=True)
  assert features.answers_in_no_window == 1
  notes = coverage_warnings(features, "t.json", max_answer_length=100, max_seq_length=16,
                            doc_stride=4)
  assert notes == ["t.json: 1 of 1 gold answers (100.0%) fit in no window of --max-seq-length "
                   "16 with --doc-stride 4 (they train as no-answer and can never be predicted); "
                   "raise --max-seq-length or lower --doc-stride"]


def test_default_max_answer_length_suits_the_language(cmrc_dev, shared_data):
  from bert_jax.finetune import squad_eval
  from bert_jax.finetune.__main__ import build_parser
  from bert_jax.finetune.tasks import DEFAULT_MAX_ANSWER_LENGTH
  assert build_parser().parse_args(["--task", "qa", "--init", "x", "--train-file", "t",
                                    "--validation-file", "v", "--output-dir", "o"]
                                   ).max_answer_length is None   # chosen from the data
  assert DEFAULT_MAX_ANSWER_LENGTH[squad_eval.detect_language(cmrc_dev)] == 50
  assert DEFAULT_MAX_ANSWER_LENGTH["en"] == 30


def test_the_run_config_is_frozen_and_the_task_keeps_what_it_derives(shared_data, tmp_path):
  """The flags become a frozen FinetuneConfig once (QA's defaults resolved there); QA picks
  its --max-answer-length from the data for itself and leaves the config as it was."""
  import dataclasses

  from bert_jax.finetune.__main__ import build_parser
  from bert_jax.finetune.run_config import FinetuneConfig
  from bert_jax.finetune.tasks import QATask
  from bert_jax.tokenizer import load_tokenizer
  data = json.loads((shared_data / "cmrc2018" / "cmrc2018_trial.json").read_text("utf-8"))
  path = tmp_path / "cmrc.json"
  path.write_text(json.dumps({"data": data["data"][:1]}, ensure_ascii=False), "utf-8")
  args = build_parser().parse_args(["--task", "qa", "--init", "random", "--train-file",
                                    str(path), "--validation-file", str(path),
                                    "--output-dir", "o", "--smallest-bucket", "1024"])
  cfg = FinetuneConfig.from_args(args)
  assert (cfg.max_seq_length, cfg.doc_stride, cfg.smallest_bucket) == (384, 128, 384)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.max_answer_length = 30
  task = QATask(cfg)
  task.load(load_tokenizer(shared_data / "vocab" / "bert-base-chinese-vocab.txt"))
  assert task.max_answer_length == 50 and cfg.max_answer_length is None
  assert dataclasses.replace(cfg, max_answer_length=12) != cfg
  task = QATask(dataclasses.replace(cfg, max_answer_length=12))
  task.load(load_tokenizer(shared_data / "vocab" / "bert-base-chinese-vocab.txt"))
  assert task.max_answer_length == 12
