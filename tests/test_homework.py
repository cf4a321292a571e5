"""The Chinese reading-comprehension homework's layout (context.json + records of question,
paragraph ids, relevant, answer {text, start}), read by --task choice and --task qa; `predict`
on test files without labels (choice -> selected paragraph -> qa -> id,answer CSV); slot JSON
with joint accuracy. Synthetic Chinese text and a vocab of its characters: no shared data."""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import pytest

from bert_jax.errors import UserError
from bert_jax.finetune import paragraphs
from bert_jax.finetune.__main__ import main
from bert_jax.finetune.readers import read_choice, read_tagged

CHARS = ("的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下"
         "自之年过发后作里用道行所然家种事成方多经么去法学如都同现当没动面起看定天分还进好小部")
TINY = ["--init", "random", "--preset", "tiny", "--epochs", "1", "--batch-size", "4",
        "--max-seq-length", "32", "--smallest-bucket", "32", "--learning-rate", "1e-3",
        "--quiet"]  # one length bucket: one compile per step


def write(path: pathlib.Path, obj) -> str:
  path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
  return str(path)


@pytest.fixture
def homework(tmp_path):
  """context.json, train/valid (labeled) and test (no relevant/answer) files, and a vocab."""
  rng = np.random.default_rng(0)
  contexts = ["".join(rng.choice(list(CHARS), 30)) for _ in range(10)]
  def records(n, start_id, labeled=True):
    out = []
    for i in range(n):
      ids = [int(p) for p in rng.choice(len(contexts), 4, replace=False)]
      relevant = ids[int(rng.integers(4))]
      s = int(rng.integers(0, 25))
      text = contexts[relevant][s:s + 3]
      r = {"id": f"q{start_id + i}", "question": text + "是什么", "paragraphs": ids}
      if labeled:
        r.update(relevant=relevant, answer={"text": text, "start": s})
      out.append(r)
    return out
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHARS]) + "\n",
                   encoding="utf-8")
  return {"context": write(tmp_path / "context.json", contexts), "contexts": contexts,
          "train": write(tmp_path / "train.json", records(8, 0)),
          "valid": write(tmp_path / "valid.json", records(4, 100)),
          "test": write(tmp_path / "test.json", records(5, 200, labeled=False)),
          "vocab": str(vocab), "dir": tmp_path}


def test_choice_and_qa_read_the_homework_layout(homework):
  data = json.loads(pathlib.Path(homework["train"]).read_text(encoding="utf-8"))
  records = read_choice(homework["train"], homework["context"])
  assert len(records) == 8 and all(len(r.second) == 4 for r in records)
  for r, raw in zip(records, data):
    assert r.id == raw["id"] and r.label == raw["paragraphs"].index(raw["relevant"])
    assert r.second == [homework["contexts"][p] for p in raw["paragraphs"]]
  examples = paragraphs.read_qa(homework["train"], homework["context"])
  for e, raw in zip(examples, data):
    assert e.context == homework["contexts"][raw["relevant"]]
    start = e.answers[0]["answer_start"]
    assert e.context[start:start + 3] == raw["answer"]["text"]
  # a test file reads without labels: choice marks them unlabeled, qa needs a selection
  assert {r.label for r in read_choice(homework["test"], homework["context"], labeled=False)} \
      == {paragraphs.UNLABELED}


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("relevant"), "missing field 'relevant'"),
    (lambda r: r["paragraphs"].__setitem__(0, 99), "paragraph id 99 is not an index"),
    (lambda r: r["answer"].__setitem__("start", r["answer"]["start"] + 40),
     "is not at start"),
    (lambda r: r.pop("question"), "missing field 'question'"),
])
def test_bad_homework_records_are_one_line_errors(homework, change, message):
  data = json.loads(pathlib.Path(homework["train"]).read_text(encoding="utf-8"))
  change(data[2])
  bad = write(homework["dir"] / "bad.json", data)
  for read in (lambda: read_choice(bad, homework["context"]),
               lambda: paragraphs.read_qa(bad, homework["context"])):
    with pytest.raises(UserError, match=message) as e:
      read()
    assert "record 2" in str(e.value) and "\n" not in str(e.value)


def test_a_selection_must_name_one_of_the_questions_paragraphs(homework, tmp_path):
  test = json.loads(pathlib.Path(homework["test"]).read_text(encoding="utf-8"))
  good = {t["id"]: t["paragraphs"][1] for t in test}
  examples = paragraphs.read_qa(homework["test"], homework["context"], labeled=False,
                                selected=good)
  assert [e.context for e in examples] == [homework["contexts"][good[t["id"]]] for t in test]
  assert all(e.answers == [] for e in examples)
  outside = next(p for p in range(10) if p not in test[0]["paragraphs"])
  for selection, message in (({**good, test[0]["id"]: outside}, "is not one of its paragraphs"),
                             ({k: v for k, v in list(good.items())[1:]}, "no selected paragraph")):
    with pytest.raises(UserError, match=message):
      paragraphs.read_qa(homework["test"], homework["context"], labeled=False,
                         selected=selection)
  bad_csv = tmp_path / "sel.csv"
  bad_csv.write_text("id,answer\nq200,first\n", encoding="utf-8")
  with pytest.raises(UserError, match="is not a paragraph id"):
    paragraphs.read_selected(str(bad_csv))


def test_homework_cli_errors_exit_2(homework, capsys):
  common = ["--train-file", homework["train"], "--validation-file", homework["valid"],
            "--vocab", homework["vocab"], "--output-dir", str(homework["dir"] / "o"), *TINY]
  assert main(["--task", "choice", *common]) == 2   # no --context-file
  assert "--context-file" in capsys.readouterr().err
  neither = write(homework["dir"] / "neither.json", [{"query": "x", "passage": "y"}])
  assert main(["--task", "qa", *common, "--train-file", neither]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and "'paragraphs'" in err and "\n" not in err


def _homework_args(homework):
  return ["--train-file", homework["train"], "--validation-file", homework["valid"],
          "--context-file", homework["context"], "--vocab", homework["vocab"], *TINY]


def test_choice_predicts_a_paragraph_id_per_test_question(homework):
  d = homework["dir"]
  assert main(["--task", "choice", "--output-dir", str(d / "choice"),
               *_homework_args(homework)]) == 0
  assert main(["predict", "--model", str(d / "choice"), "--test-file", homework["test"],
               "--context-file", homework["context"], "--output", str(d / "selected.csv")]) == 0
  selected = list(csv.DictReader(open(d / "selected.csv", encoding="utf-8")))
  test = json.loads(pathlib.Path(homework["test"]).read_text(encoding="utf-8"))
  assert [r["id"] for r in selected] == [t["id"] for t in test]
  for r, t in zip(selected, test):
    assert int(r["answer"]) in t["paragraphs"]
  scores = json.loads((d / "selected.scores.json").read_text(encoding="utf-8"))
  assert list(scores) == [t["id"] for t in test]
  assert all(s["candidates"] == t["paragraphs"] and len(s["scores"]) == 4
             for s, t in zip(scores.values(), test))
  assert np.allclose([sum(s["probabilities"]) for s in scores.values()], 1.0, atol=1e-5)


def test_qa_predicts_spans_of_the_selected_paragraphs(homework, capsys):
  """Stage two: the test file has no `relevant`; a choice model's CSV (here written by hand,
  as `predict --task choice` writes it) names each question's paragraph."""
  d = homework["dir"]
  assert main(["--task", "qa", "--output-dir", str(d / "qa"), "--doc-stride", "8",
               *_homework_args(homework)]) == 0
  test = json.loads(pathlib.Path(homework["test"]).read_text(encoding="utf-8"))
  pick = {t["id"]: t["paragraphs"][i % 4] for i, t in enumerate(test)}
  (d / "selected.csv").write_text("id,answer\n" + "".join(f"{k},{v}\n" for k, v in pick.items()),
                                  encoding="utf-8")
  ctx = ["--test-file", homework["test"], "--context-file", homework["context"]]
  assert main(["predict", "--model", str(d / "qa"), *ctx, "--output", str(d / "x.csv")]) == 2
  assert "--selected-paragraphs" in capsys.readouterr().err
  assert main(["predict", "--task", "qa", "--model", str(d / "qa"), *ctx,
               "--selected-paragraphs", str(d / "selected.csv"),
               "--output", str(d / "answers.csv")]) == 0
  answers = list(csv.DictReader(open(d / "answers.csv", encoding="utf-8")))
  assert [a["id"] for a in answers] == list(pick)
  for a in answers:
    assert a["answer"] and a["answer"] in homework["contexts"][pick[a["id"]]]
  nbest = json.loads((d / "answers.scores.json").read_text(encoding="utf-8"))
  assert set(nbest) == set(pick)
  for qid, spans in nbest.items():
    assert spans and all(c["text"] in homework["contexts"][pick[qid]] for c in spans)
    assert sum(c["probability"] for c in spans) == pytest.approx(1.0, abs=1e-5)
  # the wrong model for the task is one line
  assert main(["predict", "--task", "choice", "--model", str(d / "qa"), *ctx,
               "--output", str(d / "y.csv")]) == 2
  assert "fine-tuned for qa" in capsys.readouterr().err


SLOTS_TRAIN = [{"tokens": ["我", "要", "去", "北", "京"], "tags": ["O", "O", "O", "B-loc", "I-loc"],
                "id": "t0"},
               {"tokens": ["他", "在", "上", "海"], "tags": ["O", "O", "B-loc", "I-loc"], "id": "t1"}]


def test_slot_json_reads_and_scores_joint_accuracy(homework):
  path = write(homework["dir"] / "slots.json", SLOTS_TRAIN)
  sentences = read_tagged(path)
  assert [s.id for s in sentences] == ["t0", "t1"] and sentences[0].tags[3] == "B-loc"
  test = write(homework["dir"] / "slots_test.json", [{"tokens": ["我", "去"], "id": "x"}])
  assert read_tagged(test, labeled=False)[0].tags == []
  with pytest.raises(UserError, match="missing field 'tags'"):
    read_tagged(test)
  bad = write(homework["dir"] / "bad.json", [{"tokens": ["我"], "tags": ["O", "O"]}])
  with pytest.raises(UserError, match="one tag per token"):
    read_tagged(bad)
  # joint accuracy by hand: sentence 0 all right, sentence 1 one tag wrong -> 1/2
  from bert_jax.finetune.tasks import TokenTask
  task = TokenTask(None)
  task.valid = sentences
  task.word_tags = lambda feats, out: [list(sentences[0].tags), ["O", "O", "B-loc", "O"]]
  scores = task.score(None, None)
  assert scores["joint_accuracy"] == 0.5
  assert scores["accuracy"] == pytest.approx(8 / 9)


def test_intent_predictions_are_keyed_by_id(homework):
  """HW1: intent JSON -> `id,intent`; slot JSON -> `id,tags` (one tag per token)."""
  d = homework["dir"]
  intents = [{"text": t, "intent": i, "id": f"i{n}"} for n, (t, i) in
             enumerate([("我要去北京", "go"), ("他在上海", "be")] * 4)]
  train = write(d / "intent.json", intents)
  test = write(d / "intent_test.json", [{"text": "我要去上海", "id": "z1"},
                                        {"text": "他在北京", "id": "z0"}])
  common = ["--vocab", homework["vocab"], *TINY]
  assert main(["--task", "classification", "--train-file", train, "--validation-file", train,
               "--output-dir", str(d / "intent"), *common]) == 0
  assert main(["predict", "--model", str(d / "intent"), "--test-file", test,
               "--output", str(d / "intent.csv")]) == 0
  rows = list(csv.reader(open(d / "intent.csv", encoding="utf-8")))
  assert rows[0] == ["id", "intent"] and [r[0] for r in rows[1:]] == ["z1", "z0"]
  assert {r[1] for r in rows[1:]} <= {"go", "be"}
  valid = list(csv.DictReader(open(d / "intent" / "predictions.tsv", encoding="utf-8"),
                              delimiter="\t"))
  assert [v["id"] for v in valid] == [i["id"] for i in intents]
  assert [v["label"] for v in valid] == [i["intent"] for i in intents]


def test_slot_predictions_are_keyed_by_id(homework):
  d = homework["dir"]
  common = ["--vocab", homework["vocab"], *TINY]
  slots = write(d / "slots.json", SLOTS_TRAIN * 2)
  test = write(d / "slots_test.json", [{"tokens": ["我", "去", "北", "京"], "id": "s9"},
                                       {"tokens": ["他"], "id": "s8"}])
  assert main(["--task", "token", "--train-file", slots, "--validation-file", slots,
               "--output-dir", str(d / "slots"), *common]) == 0
  metrics = json.loads((d / "slots" / "metrics.json").read_text())
  assert 0 <= metrics["joint_accuracy"] <= 1
  assert main(["predict", "--model", str(d / "slots"), "--test-file", test,
               "--output", str(d / "slots.csv")]) == 0
  rows = list(csv.reader(open(d / "slots.csv", encoding="utf-8")))
  assert rows[0] == ["id", "tags"] and [r[0] for r in rows[1:]] == ["s9", "s8"]
  assert [len(r[1].split()) for r in rows[1:]] == [4, 1]
  assert set(" ".join(r[1] for r in rows[1:]).split()) <= {"O", "B-loc", "I-loc"}


@pytest.mark.slow  # two fine-tunes (about 45 s on 2 cores)
def test_two_stage_pipeline_in_one_command_scores_a_labeled_file(homework, capsys):
  """predict --choice-model: select, then extract; on valid.json (with `relevant` and
  `answer`) it prints selection accuracy and the pipeline's EM/F1."""
  d = homework["dir"]
  for task in ("choice", "qa"):
    assert main(["--task", task, "--output-dir", str(d / task), "--doc-stride", "8",
                 *_homework_args(homework)]) == 0
  capsys.readouterr()
  assert main(["predict", "--model", str(d / "qa"), "--choice-model", str(d / "choice"),
               "--test-file", homework["valid"], "--context-file", homework["context"],
               "--output", str(d / "pipeline.csv")]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert 0 <= report["selection_accuracy"] <= 1 and 0 <= report["f1"] <= 100
  assert 0 <= report["exact_match"] <= report["f1"] + 1e-9
  valid = json.loads(pathlib.Path(homework["valid"]).read_text(encoding="utf-8"))
  rows = list(csv.DictReader(open(d / "pipeline.csv", encoding="utf-8")))
  scores = json.loads((d / "pipeline.scores.json").read_text(encoding="utf-8"))
  assert [r["id"] for r in rows] == [v["id"] for v in valid]
  right = 0
  for r, v in zip(rows, valid):
    chosen = scores[r["id"]]["selection"]["selected"]
    assert chosen in v["paragraphs"] and r["answer"] in homework["contexts"][chosen]
    right += chosen == v["relevant"]
  assert report["selection_accuracy"] == pytest.approx(right / len(valid), abs=1e-4)


def test_cmrc2018_trial_in_the_homework_layout(shared_data, tmp_path):
  """Real Chinese data: CMRC 2018 trial rewritten as the homework ships (four paragraphs per
  question, one relevant) reads as the same QA examples as its SQuAD layout, answer starts
  corrected the same way (the trial has some a character or two off)."""
  from bert_jax.finetune import qa
  source = str(shared_data / "cmrc2018" / "cmrc2018_trial.json")
  squad = qa.read_squad(source)[:200]
  raw = {q["id"]: q["answers"][0] for a in json.load(open(source, encoding="utf-8"))["data"]
         for p in a["paragraphs"] for q in p["qas"]}
  contexts = list(dict.fromkeys(e.context for e in squad))
  rng = np.random.default_rng(0)
  records, moved = [], 0
  for e in squad:
    relevant = contexts.index(e.context)
    others = [int(p) for p in rng.permutation(len(contexts)) if p != relevant][:3]
    ids = others[:1] + [relevant] + others[1:]
    answer = raw[e.id]  # as the file gives it, before read_squad's correction
    moved += answer["answer_start"] != e.answers[0]["answer_start"]
    records.append({"id": e.id, "question": e.question, "paragraphs": ids,
                    "relevant": relevant, "answer": {"text": answer["text"],
                                                     "start": answer["answer_start"]}})
  assert moved  # the sample holds starts that need the correction
  ctx = write(tmp_path / "context.json", contexts)
  path = write(tmp_path / "train.json", records)
  examples = paragraphs.read_qa(path, ctx)
  assert [(e.id, e.context, e.answers[0]) for e in examples] == \
      [(e.id, e.context, e.answers[0]) for e in squad]
  assert {r.label for r in read_choice(path, ctx)} == {1}
  # the same questions as a SQuAD-layout test file without answers read for prediction
  data = json.load(open(source, encoding="utf-8"))
  for article in data["data"]:
    for p in article["paragraphs"]:
      for q in p["qas"]:
        del q["answers"]
  test = write(tmp_path / "test_squad.json", data)
  with pytest.raises(UserError, match="missing field 'answers'"):
    paragraphs.read_qa(test)
  unlabeled = paragraphs.read_qa(test, labeled=False)
  assert [e.id for e in unlabeled[:200]] == [e.id for e in squad]
  assert all(e.answers == [] for e in unlabeled)


def test_cpu_run_data_holds_its_valid_paragraphs_out(shared_data, tmp_path):
  """tools/make_homework_data.py (the data of tools/homework_cpu_run.sh): the homework layout
  from CMRC 2018, every valid question's four paragraphs (relevant and distractors) outside
  the training questions' paragraphs, and a test file without labels."""
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
  import make_homework_data
  cmrc = shared_data / "cmrc2018"
  counts = make_homework_data.build(str(cmrc / "cmrc2018_dev.json"),
                                    str(cmrc / "cmrc2018_trial.json"), str(tmp_path), 60, 20, 0)
  assert counts["train"] == 60 and counts["valid"] == 20
  ctx = str(tmp_path / "context.json")
  train = paragraphs.read_records(str(tmp_path / "train.json"), ctx)[0]
  valid = paragraphs.read_records(str(tmp_path / "valid.json"), ctx)[0]
  seen = {p for r in train for p in r["paragraphs"]} | set(range(counts["train_paragraphs"]))
  assert all(len(set(r["paragraphs"])) == 4 and r["relevant"] in r["paragraphs"]
             for r in train + valid)
  assert not seen & {p for r in valid for p in r["paragraphs"]}
  assert {r.label for r in read_choice(str(tmp_path / "test.json"), ctx, labeled=False)} == \
      {paragraphs.UNLABELED}
  corpus = (tmp_path / "corpus.txt").read_text(encoding="utf-8")
  contexts = json.loads(pathlib.Path(ctx).read_text(encoding="utf-8"))
  lines = set(corpus.splitlines())  # pretraining sees no valid paragraph's sentence
  held_out = [t for r in valid for t in make_homework_data.sentences(contexts[r["relevant"]])
              if len(t) > 10]
  assert held_out and not lines & set(held_out)
  assert set(make_homework_data.sentences(contexts[train[0]["relevant"]])) <= lines
