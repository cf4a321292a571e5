"""Task readers and featurisation: classification tables, CoNLL tagging, multiple choice, and
the length-bucketed batcher."""

from __future__ import annotations

import json
import types
import warnings

import numpy as np
import pytest

from bert_jax.errors import UserError
from bert_jax.finetune import featurize, readers
from bert_jax.finetune.batching import make_batch, make_buckets, train_batches
from bert_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(minilm_dir):
  return load_tokenizer(minilm_dir / "vocab.txt")


def write(tmp_path, name, text):
  p = tmp_path / name
  p.write_text(text, encoding="utf-8")
  return str(p)


# -- classification --------------------------------------------------------------------------

def test_sst2_header_is_detected(shared_data):
  path = str(shared_data / "glue" / "SST-2" / "dev.tsv")
  records = readers.read_text_records(path)
  assert len(records) == 6735
  assert records[0].line == 2 and records[0].pair is None
  assert records[0].text.startswith("the expressive power") and records[0].label == "1"
  names, regression = readers.build_label_map(records, path, None)
  assert names == ["0", "1"] and not regression


def test_headerless_csv_jsonl_and_named_columns(tmp_path):
  headerless = write(tmp_path, "a.tsv", "good film\tpos\nbad film\tneg\n")
  r = readers.read_text_records(headerless)
  assert [(x.text, x.label, x.line) for x in r] == [("good film", "pos", 1), ("bad film", "neg", 2)]
  pairs = write(tmp_path, "b.csv", 'premise,hypothesis,gold_label\n"a, b",c,entailment\nd,e,neutral\n')
  r = readers.read_text_records(pairs)
  assert (r[0].text, r[0].pair, r[0].label) == ("a, b", "c", "entailment")
  jsonl = write(tmp_path, "c.jsonl", '{"q": "x", "y": 3}\n\n{"q": "z", "y": 10}\n')
  r = readers.read_text_records(jsonl, text_column="q", label_column="y")
  assert [(x.text, x.label, x.line) for x in r] == [("x", "3", 1), ("z", "10", 3)]
  names, regression = readers.build_label_map(r, jsonl, None)
  assert names == ["3", "10"] and not regression  # integer labels in numeric order
  scores = write(tmp_path, "d.tsv", "sentence1\tsentence2\tscore\na\tb\t3.8\nc\td\t1\n")
  _, regression = readers.build_label_map(readers.read_text_records(scores), scores, None)
  assert regression


def test_table_errors_name_file_and_line(tmp_path):
  with pytest.raises(UserError, match=r"e\.tsv: empty"):
    readers.read_text_records(write(tmp_path, "e.tsv", "\n\n"))
  with pytest.raises(UserError, match=r"f\.tsv:3: 1 fields"):
    readers.read_text_records(write(tmp_path, "f.tsv", "sentence\tlabel\na\t1\nb\n"))
  with pytest.raises(UserError, match="no label column 'gold'"):
    readers.read_text_records(write(tmp_path, "g.tsv", "sentence\tlabel\na\t1\n"),
                            label_column="gold")
  with pytest.raises(UserError, match=r"h\.jsonl:2: not valid JSON"):
    readers.read_text_records(write(tmp_path, "h.jsonl", '{"text": "a"}\n{oops\n'))


def test_labels_that_spell_one_class_two_ways_are_refused(tmp_path):
  """0 / 1 / 1.0 / neg / positive used to train a 5-class model without a word."""
  rows = ["sentence\tlabel"] + [f"text {i}\t{label}" for i, label in
                                 enumerate(["0", "1", "1.0", "neg", "positive", "0", "1"])]
  mixed = write(tmp_path, "mixed.tsv", "\n".join(rows) + "\n")
  with pytest.raises(UserError, match=r"mixed\.tsv: the labels mix numbers and words "
                                      r"\(0, 1, 1\.0, neg, positive\).*--label-column"):
    readers.build_label_map(readers.read_text_records(mixed), mixed, None)
  numbers = write(tmp_path, "numbers.tsv", "sentence\tlabel\na\t0\nb\t1\nc\t1.0\n")
  with pytest.raises(UserError, match=r"spell one class two ways \('1' and '1\.0'\)"):
    readers.build_label_map(readers.read_text_records(numbers), numbers, None)
  words = write(tmp_path, "words.tsv", "sentence\tlabel\na\tPositive\nb\tpositive\nc\tneg\n")
  with pytest.raises(UserError, match="spell one class two ways"):
    readers.build_label_map(readers.read_text_records(words), words, None)
  # Consistent labels are fine, and so is a numeric regression target.
  ok = write(tmp_path, "ok.tsv", "sentence\tlabel\na\tneg\nb\tpos\n")
  assert readers.build_label_map(readers.read_text_records(ok), ok, None) == (["neg", "pos"], False)
  floats = write(tmp_path, "floats.tsv", "sentence\tlabel\na\t0.0\nb\t1.0\nc\t0.5\n")
  assert readers.build_label_map(readers.read_text_records(floats), floats, None) == ([], True)


def test_headerless_news_csv_names_the_column_flags(tmp_path):
  """class, title, description without a header (the usual news-topic layout) is not read as
  text = class id, pair = title, label = description."""
  rows = [f'"{1 + i % 4}","Title number {i}","A longer description of story {i}, told."'
          for i in range(60)]
  news = write(tmp_path, "news.csv", "\n".join(rows) + "\n")
  with pytest.raises(UserError, match=r"news\.csv: the text column '0' holds only numbers "
                                      r"\(class ids\?\); a file without a header is read as "
                                      r"text, pair, label; name the columns with --text-column "
                                      r"and --label-column"):
    readers.read_text_records(news)
  r = readers.read_text_records(news, text_column="1", pair_column="2", label_column="0")
  assert (r[0].text, r[0].label) == ("Title number 0", "1")
  # A label column that is text (a different value in most rows) is refused the same way.
  swapped = write(tmp_path, "swapped.tsv", "\n".join(
      f"title {i}\tdescription of story number {i}" for i in range(60)) + "\n")
  with pytest.raises(UserError, match="label column '1' has 60 different values in 60 rows, so "
                                      "it looks like text; a file without a header"):
    readers.read_text_records(swapped)


def test_unknown_validation_label_is_reported(tmp_path, tok):
  train = readers.read_text_records(write(tmp_path, "t.tsv", "sentence\tlabel\na\tx\nb\ty\n"))
  names, _ = readers.build_label_map(train, "t.tsv", None)
  valid_path = write(tmp_path, "v.tsv", "sentence\tlabel\na\tx\nb\tz\n")
  valid = readers.read_text_records(valid_path)
  with pytest.raises(UserError, match=r"v\.tsv:3: label 'z' does not occur"):
    featurize.featurize_text(valid, tok, 16, names, False, valid_path)


def test_packing_matches_transformers_tokenizer(minilm_dir, tok):
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  texts = [("A short one.", None), ("the quick brown fox jumps over the lazy dog " * 3,
                                    "and a second, much shorter part"),
           ("tiny", "a very long second segment that needs to be cut down " * 2),
           ("Equal length words here", "Equal length words there")]
  records = [readers.TextRecord(a, b, "0", i) for i, (a, b) in enumerate(texts)]
  for max_len in (12, 20, 64):
    f = featurize.featurize_text(records, tok, max_len, ["0"], False, "x")
    for i, (a, b) in enumerate(texts):
      want = hf(a, b, truncation="longest_first", max_length=max_len)
      n = f.lengths[i]
      assert f.arrays["input_ids"][i, :n].tolist() == want["input_ids"]
      assert f.arrays["token_type_ids"][i, :n].tolist() == want["token_type_ids"]
      assert f.arrays["attention_mask"][i].sum() == n and not f.arrays["input_ids"][i, n:].any()


# -- token tagging ---------------------------------------------------------------------------

CONLL = """-DOCSTART- -X- O O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
unaffable JJ B-NP B-MISC
Lamb NNP I-NP I-PER

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def test_conll_reader_and_first_subtoken_labels(tmp_path, tok):
  path = write(tmp_path, "train.conll", CONLL)
  sentences = readers.read_conll(path)
  assert [s.words for s in sentences] == [["EU", "rejects", "unaffable", "Lamb"],
                                          ["Peter", "Blackburn"]]
  assert sentences[0].tags == ["B-ORG", "O", "B-MISC", "I-PER"] and sentences[0].line == 3
  names = readers.tag_names(sentences)
  assert names[0] == "O" and set(names) == {"O", "B-ORG", "B-MISC", "I-PER", "B-PER"}
  f = featurize.featurize_tags(sentences, tok, 32, names, path)
  ids, labels = f.arrays["input_ids"][0], f.arrays["labels"][0]
  pieces = [tok.encode(w) for w in sentences[0].words]
  assert len(pieces[2]) > 1  # "unaffable" splits into several pieces
  expected_ids = [tok.cls_id] + sum(pieces, []) + [tok.sep_id]
  assert ids[:f.lengths[0]].tolist() == expected_ids
  firsts = np.cumsum([1] + [len(p) for p in pieces[:-1]])
  # One window a sentence here: each word is read where its label sits.
  assert len(f) == 2 and f.extra["word_rows"].tolist() == [0, 0, 0, 0, 1, 1]
  assert f.extra["word_columns"][:4].tolist() == firsts.tolist()
  assert [names[labels[p]] for p in firsts] == sentences[0].tags
  ignored = np.setdiff1d(np.arange(32), firsts)
  assert (labels[ignored] == featurize.IGNORE).all()


def test_conll_errors(tmp_path, tok):
  one_word = readers.read_conll(write(tmp_path, "m.conll", "EU B-ORG\n"))
  with pytest.raises(UserError, match=r"--max-seq-length 2: no room for a word"):
    featurize.featurize_tags(one_word, tok, 2, ["O", "B-ORG"], "m.conll")
  with pytest.raises(UserError, match="empty file"):
    readers.read_conll(write(tmp_path, "e.conll", "\n-DOCSTART- O\n\n"))
  with pytest.raises(UserError, match=r"b\.conll:2: expected 'word"):
    readers.read_conll(write(tmp_path, "b.conll", "EU B-ORG\nlonely\n"))
  path = write(tmp_path, "v.conll", "EU B-ORG\n\nParis B-LOC\n")
  with pytest.raises(UserError, match=r"v\.conll:3: tag 'B-LOC' does not occur"):
    featurize.featurize_tags(readers.read_conll(path), tok, 16, ["O", "B-ORG"], path)


def _distinct_words(tok, n: int) -> list[str]:
  """`n` words from the vocab whose first pieces differ (every third one split into several
  pieces), so a window's labelled positions name their word."""
  words, firsts = [], set()
  vocab = [t for t in tok.vocab if t.isalpha() and t.isascii() and len(t) >= 4]
  for token in vocab[::7]:
    word = token + "zzq" if len(words) % 3 == 2 else token
    first = tok.encode(word)[0]
    if first not in firsts:
      words.append(word)
      firsts.add(first)
    if len(words) == n:
      return words
  raise AssertionError("too few distinct words in the vocab")


TAG_CYCLE = ["B-PER", "I-PER", "O", "B-LOC", "O", "O", "B-ORG", "I-ORG", "I-ORG"]


def test_a_long_sentence_keeps_every_label_in_windows(tmp_path, tok):
  """A CoNLL file without blank lines is one 240-word sentence: at --max-seq-length 32 it used
  to be cut after about 30 words, and the rest were neither trained nor scored (predicted O)."""
  from bert_jax.finetune.tasks import TokenTask
  words = _distinct_words(tok, 240)
  tags = [TAG_CYCLE[i % len(TAG_CYCLE)] for i in range(240)]
  path = write(tmp_path, "long.conll", "".join(f"{w} {t}\n" for w, t in zip(words, tags)))
  opts = types.SimpleNamespace(train_file=path, validation_file=path, max_train_rows=None,
                               max_seq_length=32, doc_stride=None)
  task = TokenTask(opts)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing is cut, so nothing to warn about
    train, valid = task.load(tok)
  assert [len(s.words) for s in task.valid] == [240]
  label_of = {tok.encode(w)[0]: task.label_names.index(t) for w, t in zip(words, tags)}
  ids, labels = train.arrays["input_ids"], train.arrays["labels"]
  assert len(train) > 240 * 1.5 / 30 and train.lengths.max() <= 32
  trained, times = set(), 0
  for row in range(len(train)):
    n = train.lengths[row]
    assert (ids[row, 0], ids[row, n - 1]) == (tok.cls_id, tok.sep_id)
    inner, inner_labels = ids[row, 1:n - 1], labels[row, 1:n - 1]
    starts = np.isin(inner, list(label_of))
    assert ((inner_labels >= 0) == starts).all()  # each word start in the window, nothing else
    assert inner_labels[starts].tolist() == [label_of[t] for t in inner[starts].tolist()]
    trained |= set(inner[starts].tolist())
    times += int(starts.sum())
  assert trained == set(label_of) and times > 240  # every word, and windows overlap
  # Evaluation reads every word from a window: the windows' own labels as the predictions
  # score every word, each correct.
  prediction = np.maximum(valid.arrays["labels"], 0)
  predicted = task.word_tags(valid, {"prediction": prediction})
  assert [len(p) for p in predicted] == [240] and predicted[0] == tags
  scores = task.score(valid, {"prediction": prediction})
  assert scores["accuracy"] == 1.0 and scores["f1"] == 1.0


def test_windowed_predictions_map_back_to_each_word_in_order(tok):
  """Fake logits whose class names the (row, column) they were read at: each word's tag comes
  from its first piece in the window where it has the most context (run_squad's score: the
  shorter side's context + 0.01 x the window length; ties to the earlier window)."""
  from bert_jax.finetune.tasks import TokenTask
  long_words = _distinct_words(tok, 60)
  sentences = [readers.TaggedSentence(["Peter", "\x00", "Blackburn"], ["B-PER", "O", "I-PER"], 1),
               readers.TaggedSentence(long_words, ["O"] * 60, 5),
               readers.TaggedSentence(["EU"], ["B-ORG"], 66)]
  T, stride, max_doc = 16, 5, 14
  f = featurize.featurize_tags(sentences, tok, T, ["O", "B-PER", "I-PER", "B-ORG"], "x", stride)
  rows = len(f)
  logits = np.zeros((rows, T, rows * T), np.float32)
  logits[np.arange(rows)[:, None], np.arange(T), np.arange(rows * T).reshape(rows, T)] = 1
  got = featurize.word_predictions(f, TokenTask(None).predict(logits, {})["prediction"])

  ids, row0, not_first_window = f.arrays["input_ids"], 0, 0
  for sentence, predicted in zip(sentences, got):
    pieces = [tok.encode(w) or [tok.unk_id] for w in sentence.words]
    doc = sum(pieces, [])
    starts = [0]
    while starts[-1] + max_doc < len(doc):
      starts.append(starts[-1] + stride)
    for k, start in enumerate(starts):  # the windows, in order, [CLS] pieces [SEP]
      window = doc[start:start + max_doc]
      assert ids[row0 + k, :len(window) + 2].tolist() == [tok.cls_id, *window, tok.sep_id]
    want, first = [], np.cumsum([0] + [len(p) for p in pieces[:-1]])
    for p in first:
      holding = [k for k, s in enumerate(starts) if s <= p < s + len(doc[s:s + max_doc])]
      score = [min(p - starts[k], starts[k] + len(doc[starts[k]:starts[k] + max_doc]) - 1 - p)
               + 0.01 * len(doc[starts[k]:starts[k] + max_doc]) for k in holding]
      best = holding[int(np.argmax(score))]
      not_first_window += best != holding[0]
      want.append((row0 + best) * T + p - starts[best] + 1)
    assert len(predicted) == len(sentence.words) and predicted.tolist() == want
    row0 += len(starts)
  assert row0 == rows and len(got) == 3 and not_first_window > 5


# -- multiple choice -------------------------------------------------------------------------

SWAG = """video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,ending1,ending2,ending3,label
anetv_1,5,"Students lift. They","Students lift.",They,gold,sit down.,jump high.,eat.,"run, fast.",1
anetv_2,6,"A man rows. He","A man rows.",He,gen,stops.,swims.,flies.,sings.,3
"""


def test_swag_reader_and_featurisation(tmp_path, tok):
  records = readers.read_choice(write(tmp_path, "swag.csv", SWAG))
  assert len(records) == 2 and records[0].label == 1 and records[1].label == 3
  assert records[0].first == ["Students lift."] * 4
  assert records[0].second[3] == "They run, fast."
  f = featurize.featurize_choice(records, tok, 24)
  assert f.arrays["input_ids"].shape == (2, 4, 24)
  row = f.arrays["input_ids"][0, 3]
  want = [tok.cls_id, *tok.encode("Students lift."), tok.sep_id, *tok.encode("They run, fast."),
          tok.sep_id]
  assert row[:len(want)].tolist() == want
  assert f.arrays["choice_mask"].all()


def test_choice_json_variants_and_errors(tmp_path, tok):
  data = [{"question": "Where is Paris?", "paragraphs": ["Paris is in France.", "Rome is old."],
           "gold": 0},
          {"question": "Capital of Italy?", "candidates": ["Rome", "Oslo", "Bern"],
           "gold": "Rome"}]
  records = readers.read_choice(write(tmp_path, "c.json", json.dumps(data)))
  assert [r.label for r in records] == [0, 0] and records[1].second == ["Rome", "Oslo", "Bern"]
  f = featurize.featurize_choice(records, tok, 16)
  assert f.arrays["choice_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
  jsonl = "\n".join(json.dumps(d) for d in data)
  assert len(readers.read_choice(write(tmp_path, "c.jsonl", jsonl))) == 2
  bad = [{"question": "q", "candidates": ["a", "b"], "gold": 2}]
  with pytest.raises(UserError, match="record 1: gold index 2"):
    readers.read_choice(write(tmp_path, "bad.json", json.dumps(bad)))
  with pytest.raises(UserError, match="missing column"):
    readers.read_choice(write(tmp_path, "bad.csv", "sent1,label\na,0\n"))


def test_blank_choice_candidates_are_refused(tmp_path):
  """A blank candidate (a shifted column, a lost field) used to be trained as a choice."""
  swag = SWAG.replace(",eat.,", ",,")
  with pytest.raises(UserError, match=r"swag\.csv:2: candidate ending2 is blank"):
    readers.read_choice(write(tmp_path, "swag.csv", swag))
  bad = [{"question": "q", "candidates": ["a", "  "], "gold": 0}]
  with pytest.raises(UserError, match="record 1: candidate 1 is blank"):
    readers.read_choice(write(tmp_path, "blank.json", json.dumps(bad)))


# -- batching --------------------------------------------------------------------------------

def test_length_buckets_and_batches():
  assert make_buckets(64) == [16, 32, 64]
  assert make_buckets(384) == [16, 32, 64, 128, 256, 384]
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 64, 1000)
  batches = train_batches(lengths, 32, rng, sort_window=4)
  assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
  # Sorting inside windows keeps a batch's lengths close together.
  spread = np.mean([np.ptp(lengths[b]) for b in batches])
  assert spread < 0.5 * np.mean([np.ptp(lengths[rng.permutation(1000)[:32]]) for _ in range(20)])
  ids = np.zeros((1000, 64), np.int32)
  ids[np.arange(64) < lengths[:, None]] = 7
  feats = featurize.Features({"input_ids": ids, "labels": np.arange(1000)}, lengths)
  batch = make_batch(feats, np.array([5, 9]), 4, make_buckets(64), ("input_ids", "labels"))
  want_len = next(b for b in (16, 32, 64) if b >= lengths[[5, 9]].max())
  assert batch["input_ids"].shape == (4, want_len)
  assert batch["weight"].tolist() == [1, 1, 0, 0] and batch["labels"].tolist() == [5, 9, 0, 0]
