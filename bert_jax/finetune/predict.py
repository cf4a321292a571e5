"""`python -m bert_jax.finetune predict`: a fine-tuned OUTPUT_DIR/best on a test file without
labels, written as the submission CSV keyed by `id` plus the raw scores as JSON beside it.

  choice           id,answer  (the selected paragraph's id; a candidate index outside the
                               homework layout)  + per-candidate scores and probabilities
  qa               id,answer  (the span text)    + the n-best spans with probabilities;
                   with --choice-model, each question's paragraph is selected first (and
                   its selection scores kept beside its spans)
  classification   id,<label column, e.g. intent> + per-class probabilities
  token            id,tags    (space-joined, one tag per word)

The task, head, labels and max_seq_length come from best/finetune.json, which the trainer
writes beside the best params (as `bert-jax-convert to-hf` reads it).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import pathlib
import sys
from typing import Any

import numpy as np

from bert_jax.errors import UserError

SCORES_SUFFIX = ".scores.json"


def build_parser() -> argparse.ArgumentParser:
  from bert_jax.finetune import TASK_NAMES
  from bert_jax.finetune.run_config import positive
  p = argparse.ArgumentParser(
      prog="python -m bert_jax.finetune predict",
      description="Predict with a fine-tuned model on a file without labels; writes the "
                  "submission CSV keyed by id and the raw scores beside it (OUTPUT"
                  f"{SCORES_SUFFIX} for OUTPUT.csv).")
  p.add_argument("--model", required=True,
                 help="a fine-tuning run's --output-dir (or its best/)")
  p.add_argument("--task", choices=TASK_NAMES, help="checked against the model's task")
  p.add_argument("--test-file", required=True)
  p.add_argument("--context-file", metavar="context.json",
                 help="choice / qa: the paragraph list of homework-layout files")
  p.add_argument("--selected-paragraphs", metavar="CSV",
                 help="qa on a test file without 'relevant': the id,answer CSV of predict "
                      "--task choice, naming each question's paragraph")
  p.add_argument("--choice-model", metavar="OUT_DIR",
                 help="qa: select each question's paragraph with this choice model first (the "
                      "two stages in one command); on a file with `relevant` and `answer`, "
                      "prints selection accuracy and the pipeline's EM/F1")
  p.add_argument("--output", required=True, help="the submission CSV")
  p.add_argument("--batch-size", type=positive(int), default=64)
  p.add_argument("--max-answer-length", type=positive(int), default=None,
                 help="qa, in tokens (default: 30; 50 for Chinese)")
  p.add_argument("--n-best", type=positive(int), default=20)
  p.add_argument("--doc-stride", type=positive(int), default=None, help="qa: default 128")
  p.add_argument("--max-query-length", type=positive(int), default=64)
  p.add_argument("--text-column")
  p.add_argument("--text-pair-column")
  return p


def load_finetuned(model: str):
  """(finetune.json, model config, params, tokenizer) of a fine-tuning run's best model."""
  from bert_jax.convert import FINETUNE_INFO
  from bert_jax.storage.checkpoint import load_checkpoint
  from bert_jax.tokenizer import find_lower_case, find_vocab, load_tokenizer
  d = pathlib.Path(model)
  best = d / "best" if (d / "best" / FINETUNE_INFO).is_file() else d
  if not (best / FINETUNE_INFO).is_file():
    raise UserError(f"--model {model}: no best/{FINETUNE_INFO}; expected the --output-dir of "
                    "a fine-tuning run")
  info = json.loads((best / FINETUNE_INFO).read_text(encoding="utf-8"))
  model_config, params, _ = load_checkpoint(best)
  vocab = find_vocab(best)
  if vocab is None:
    raise UserError(f"--model {model}: no vocab.txt in {best}")
  return info, model_config, params, load_tokenizer(vocab, find_lower_case(best, vocab))


def run_model(task, model, params, feats, max_seq_length: int, batch_size: int,
              keep_logits: bool) -> dict[str, np.ndarray]:
  """The task's predict() outputs (and its logits) for every row of `feats`, in row order:
  evaluation's loop (evaluate.run_batches) without the loss."""
  import jax
  from bert_jax.finetune.batching import eval_batches, make_batch, make_buckets
  from bert_jax.finetune.evaluate import make_eval_step, run_batches
  step = jax.jit(make_eval_step(task, model, with_loss=False, keep_logits=keep_logits))
  buckets, keys = make_buckets(max_seq_length), tuple(feats.arrays)
  out, _ = run_batches(lambda batch: step(params, batch), len(feats),
                       eval_batches(feats.lengths, batch_size),
                       lambda idx: make_batch(feats, idx, batch_size, buckets, keys),
                       task.seq_outputs, max_seq_length)
  return out


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def predict(opts: argparse.Namespace) -> tuple[list[list[str]], dict[str, Any]]:
  """(CSV rows with the header first, raw scores by id)."""
  from bert_jax.finetune.tasks import TASKS
  info, model_config, params, tok = load_finetuned(opts.model)
  name = info["task"]
  if opts.task and opts.task != name:
    raise UserError(f"--task {opts.task}: the model {opts.model} was fine-tuned for {name}")
  task = TASKS[name]()  # the model side only: heads, predict(), outputs
  max_seq_length = int(info["max_seq_length"])
  task.num_labels = int(info.get("num_labels", task.num_labels))
  labels = [info["id2label"][str(i)] for i in range(len(info.get("id2label", {})))]
  model = task.model(model_config)

  def run(feats, keep_logits: bool):
    return run_model(task, model, params, feats, max_seq_length, opts.batch_size,
                     keep_logits)
  return PREDICTORS[name](opts, info, task, tok, labels, run)


# Each task's prediction: (CSV rows, scores by id) from the test file; `run(feats,
# keep_logits)` is run_model with the loaded model.
def _choice(opts, info, task, tok, labels, run):
  """id,answer: each question's selected paragraph id; per-candidate scores."""
  from bert_jax.finetune.featurize import featurize_choice
  from bert_jax.finetune.readers import read_choice
  path, T = opts.test_file, int(info["max_seq_length"])
  records = read_choice(path, opts.context_file, labeled=False)
  feats = featurize_choice(records, tok, T)
  out = run(feats, True)
  ids = _paragraph_ids(path, opts.context_file, records)
  rows, scores = [["id", "answer"]], {}
  for r, cand, pred, logits in zip(records, ids, out["prediction"], out["logits"]):
    logits = logits[:len(cand)]
    rows.append([r.id, str(cand[int(pred)])])
    scores[r.id] = {"candidates": cand, "scores": logits.tolist(),
                    "probabilities": _softmax(logits).tolist()}
  return rows, scores


def _qa(opts, info, task, tok, labels, run):
  """id,answer of spans in each question's relevant (or selected) paragraph; n-best spans."""
  from bert_jax.finetune import paragraphs, qa, squad_eval
  from bert_jax.finetune.featurize import Features
  from bert_jax.finetune.run_config import DEFAULT_QA_DOC_STRIDE
  from bert_jax.finetune.tasks import DEFAULT_MAX_ANSWER_LENGTH
  path, T = opts.test_file, int(info["max_seq_length"])
  selected = (paragraphs.read_selected(opts.selected_paragraphs)
              if opts.selected_paragraphs else None)
  if opts.choice_model:
    choice_rows, choice_scores = predict(argparse.Namespace(
        **{**vars(opts), "model": opts.choice_model, "task": "choice", "choice_model": None}))
    selected = {qid: int(p) for qid, p in choice_rows[1:]}
  examples = paragraphs.read_qa(path, opts.context_file, labeled=False, selected=selected)
  stride = opts.doc_stride or DEFAULT_QA_DOC_STRIDE
  features = qa.featurize(examples, tok, max_seq_length=T, doc_stride=stride,
                          max_query_length=opts.max_query_length, is_training=False)
  arrays = {k: np.asarray(getattr(features, k), np.int32)
            for k in ("input_ids", "token_type_ids", "attention_mask")}
  feats = Features(arrays, arrays["attention_mask"].sum(-1).astype(np.int32))
  out = run(feats, False)
  max_answer = (opts.max_answer_length or
                DEFAULT_MAX_ANSWER_LENGTH[squad_eval.detect_language(examples)])
  answers, nbest, _ = qa.postprocess(examples, features, out["start_logits"],
                                     out["end_logits"], n_best=opts.n_best,
                                     max_answer_length=max_answer, return_nbest=True)
  if opts.choice_model:
    _report_pipeline(path, opts.context_file, selected, examples, answers)
    nbest = {qid: {"selection": {**choice_scores[qid], "selected": selected[qid]},
                   "nbest": spans} for qid, spans in nbest.items()}
  return [["id", "answer"]] + [[e.id, answers[e.id]] for e in examples], nbest


def _classification(opts, info, task, tok, labels, run):
  from bert_jax.finetune.featurize import featurize_text
  from bert_jax.finetune.readers import read_text_records
  path, T = opts.test_file, int(info["max_seq_length"])
  records = read_text_records(path, opts.text_column, opts.text_pair_column, label_column=None)
  regression = info.get("problem_type") == "regression"
  feats = featurize_text(records, tok, T, labels, regression, path, labeled=False)
  task.regression = regression
  out = run(feats, True)
  column = info.get("label_column") or "label"
  rows, scores = [["id", column]], {}
  for r, pred, logits in zip(records, out["prediction"], out["logits"]):
    rid = r.id if r.id is not None else str(r.line)
    rows.append([rid, f"{float(pred):.6g}" if regression else labels[int(pred)]])
    scores[rid] = ({"score": float(pred)} if regression else
                   dict(zip(labels, _softmax(logits).tolist())))
  return rows, scores


def _token(opts, info, task, tok, labels, run):
  from bert_jax.finetune.featurize import featurize_tags
  from bert_jax.finetune.readers import read_tagged
  path, T = opts.test_file, int(info["max_seq_length"])
  sentences = read_tagged(path, labeled=False)
  for s in sentences:  # placeholders: featurize_tags labels words, predict ignores them
    s.tags = [labels[0]] * len(s.words)
  task.label_names = labels
  feats = featurize_tags(sentences, tok, T, labels, path, opts.doc_stride)
  out = run(feats, False)
  rows = [["id", "tags"]]
  for s, tags in zip(sentences, task.word_tags(feats, out)):
    rows.append([s.id if s.id is not None else str(s.line), " ".join(tags)])
  return rows, {}


PREDICTORS = {"choice": _choice, "qa": _qa, "classification": _classification, "token": _token}


def _report_pipeline(path, context_file, selected, examples, answers) -> None:
  """On a labeled file: selection accuracy and the whole pipeline's EM/F1 (official CMRC /
  SQuAD normalisation) as one JSON line on stdout."""
  from bert_jax.finetune import paragraphs, squad_eval
  records, _ = paragraphs.read_records(path, context_file, labeled=False)
  if any(r["relevant"] is None or r["answer"] is None for r in records):
    return  # a test file: nothing to score
  right = [selected[r["id"]] == r["relevant"] for r in records]
  scores = squad_eval.evaluate(examples, answers, lang="auto")
  print(json.dumps({"selection_accuracy": round(float(np.mean(right)), 4),
                    **{k: round(v, 4) if isinstance(v, float) else v
                       for k, v in scores.items()}}))


def _paragraph_ids(path: str, context_file: str | None, records) -> list[list]:
  """Each choice record's candidates as the homework's paragraph ids (indices otherwise)."""
  from bert_jax.finetune import paragraphs
  if context_file and path.lower().endswith(".json"):
    data = paragraphs.load_json(path)
    if paragraphs.is_paragraph_layout(data):
      return [r["paragraphs"] for r in data]
  return [list(range(len(r.second))) for r in records]


def scores_path(output: str) -> pathlib.Path:
  p = pathlib.Path(output)
  return p.with_name(p.stem + SCORES_SUFFIX)


def main(argv: list[str]) -> int:
  from bert_jax.storage.fileio import write_text_atomic
  opts = build_parser().parse_args(argv)
  rows, scores = predict(opts)
  buf = io.StringIO()
  csv.writer(buf, lineterminator="\n").writerows(rows)
  write_text_atomic(opts.output, buf.getvalue())
  written = [opts.output]
  if scores:
    write_text_atomic(scores_path(opts.output),
                      json.dumps(scores, ensure_ascii=False, indent=1) + "\n")
    written.append(str(scores_path(opts.output)))
  print(f"{len(rows) - 1} predictions: {', '.join(written)}", file=sys.stderr)
  return 0
