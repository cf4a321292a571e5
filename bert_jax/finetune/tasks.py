"""The fine-tuning tasks: how each task reads its files, which head it builds, its loss,
what an evaluation keeps per row, and how that becomes metrics and a predictions file. The
trainer is generic over them; reading is readers.py's, featurisation featurize.py's.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np

from bert_jax.errors import UserError
from bert_jax.finetune import squad_eval
from bert_jax.finetune.featurize import (Features, featurize_choice, featurize_tags,
                                         featurize_text, word_predictions)
from bert_jax.finetune.paragraphs import read_qa
from bert_jax.finetune.readers import (build_label_map, read_choice, read_tagged,
                                       read_text_records, tag_names)
from bert_jax.finetune.run_config import FinetuneConfig
from bert_jax.storage.fileio import write_text_atomic


def _masked_ce(logits, labels, weight):
  """Cross-entropy summed over the rows (or tokens) of weight > 0; labels < 0 are ignored."""
  import jax
  import jax.numpy as jnp
  logp = jax.nn.log_softmax(logits, axis=-1)
  safe = jnp.where(labels < 0, 0, labels)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return (nll * weight).sum()


class Task:
  name = ""
  architecture = ""
  main_metric = ""
  seq_outputs: tuple[str, ...] = ()  # predict() outputs with a token axis (padded back to T)
  num_labels = 2
  packable = False  # reads [CLS] only, so several sequences can share a row (packing.py)

  def __init__(self, cfg: FinetuneConfig | None = None):
    self.cfg = cfg  # read, never written; None where only the model side is used (predict)

  # The training loss is loss(outputs, batch) summed over what count(batch) counts (the rows of
  # weight > 0; tokens for tagging), so accumulated micro-batches add up to one batch.
  def count(self, batch):
    return batch["weight"].sum()

  def model(self, config):
    from bert_jax.modeling import heads
    return heads.FINETUNE_HEADS[self.architecture](config, num_labels=self.num_labels)

  def hf_config(self) -> dict:
    return {}

  def finetune_info(self) -> dict:
    return {"task": self.name, "architecture": self.architecture, **self.hf_config()}


class ClassificationTask(Task):
  name, architecture = "classification", "BertForSequenceClassification"
  packable = True

  def load(self, tokenizer):
    cfg = self.cfg
    cols = dict(text_column=cfg.text_column, pair_column=cfg.text_pair_column,
                label_column=cfg.label_column)
    train = read_text_records(cfg.train_file, max_rows=cfg.max_train_rows, **cols)
    valid = read_text_records(cfg.validation_file, **cols)
    self.label_names, self.regression = build_label_map(train, cfg.train_file, cfg.regression)
    if not self.regression and len(self.label_names) < 2:
      raise UserError(f"{cfg.train_file}: only one label ({self.label_names[0]!r}); "
                      "classification needs two or more")
    self.num_labels = 1 if self.regression else len(self.label_names)
    self.main_metric = "pearson" if self.regression else "accuracy"
    self.valid_records = valid
    self.label_column = train[0].label_key
    feats = [featurize_text(r, tokenizer, cfg.max_seq_length, self.label_names,
                            self.regression, p)
             for r, p in ((train, cfg.train_file), (valid, cfg.validation_file))]
    return feats[0], feats[1]

  def loss(self, logits, batch):
    w = batch["weight"]
    if self.regression:
      return (((logits[:, 0] - batch["labels"]) ** 2) * w).sum()
    return _masked_ce(logits, batch["labels"], w)

  def predict(self, logits, batch):
    return {"prediction": logits[:, 0] if self.regression else logits.argmax(-1)}

  def score(self, feats, out):
    from bert_jax.finetune import metrics
    labels, pred = feats.arrays["labels"], out["prediction"]
    if self.regression:
      return metrics.regression_scores(labels, pred)
    return metrics.classification_scores(labels, pred, self.num_labels)

  def write_predictions(self, out_dir, feats, out) -> str:
    path = os.path.join(out_dir, "predictions.tsv")
    keyed = any(r.id is not None for r in self.valid_records)  # rows with ids: keyed by id
    lines = ["id\t" * keyed + "line\tprediction\tlabel"]
    for r, p in zip(self.valid_records, out["prediction"]):
      shown = f"{float(p):.6g}" if self.regression else self.label_names[int(p)]
      lines.append(f"{r.id}\t" * keyed + f"{r.line}\t{shown}\t{r.label}")
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path

  def finetune_info(self):
    return {**super().finetune_info(), "label_column": self.label_column}

  def hf_config(self):
    if self.regression:
      return {"num_labels": 1, "problem_type": "regression"}
    id2label = {str(i): n for i, n in enumerate(self.label_names)}
    return {"num_labels": self.num_labels, "id2label": id2label,
            "label2id": {n: i for i, n in enumerate(self.label_names)},
            "problem_type": "single_label_classification"}


class TokenTask(Task):
  name, architecture, main_metric = "token", "BertForTokenClassification", "f1"
  seq_outputs = ("prediction",)

  def load(self, tokenizer):
    cfg = self.cfg
    train = read_tagged(cfg.train_file)[:cfg.max_train_rows or None]
    self.valid = read_tagged(cfg.validation_file)
    self.label_names = tag_names(train)
    self.num_labels = len(self.label_names)
    # Sentences longer than a row are split into windows `--doc-stride` apart (default: half
    # a row), so every word is trained and predicted.
    return (featurize_tags(train, tokenizer, cfg.max_seq_length, self.label_names,
                           cfg.train_file, cfg.doc_stride),
            featurize_tags(self.valid, tokenizer, cfg.max_seq_length, self.label_names,
                           cfg.validation_file, cfg.doc_stride))

  def _token_weight(self, batch):
    return (batch["labels"] >= 0) * batch["weight"][:, None]

  def loss(self, logits, batch):
    return _masked_ce(logits, batch["labels"], self._token_weight(batch))

  def count(self, batch):
    return self._token_weight(batch).sum()

  def predict(self, logits, batch):
    return {"prediction": logits.argmax(-1).astype("int32")}

  def word_tags(self, feats, out) -> list[list[str]]:
    """A tag for every word of every validation sentence, each from its max-context window."""
    return [[self.label_names[t] for t in ids.tolist()]
            for ids in word_predictions(feats, out["prediction"])]

  def score(self, feats, out):
    from bert_jax.finetune import metrics
    gold, pred = [s.tags for s in self.valid], self.word_tags(feats, out)
    # joint accuracy: a sentence counts only when every tag is right (the slot-tagging metric)
    return {**metrics.entity_scores(gold, pred),
            "joint_accuracy": float(np.mean([g == p for g, p in zip(gold, pred)]))}

  def write_predictions(self, out_dir, feats, out) -> str:
    path = os.path.join(out_dir, "predictions.tsv")
    lines = []
    for s, pred in zip(self.valid, self.word_tags(feats, out)):
      lines += [f"{w}\t{g}\t{p}" for w, g, p in zip(s.words, s.tags, pred)] + [""]
    write_text_atomic(path, "\n".join(lines))
    return path

  def hf_config(self):
    return {"num_labels": self.num_labels,
            "id2label": {str(i): n for i, n in enumerate(self.label_names)},
            "label2id": {n: i for i, n in enumerate(self.label_names)}}


class ChoiceTask(Task):
  name, architecture, main_metric = "choice", "BertForMultipleChoice", "accuracy"
  num_labels = 1

  def load(self, tokenizer):
    cfg = self.cfg
    ctx = cfg.context_file
    train = read_choice(cfg.train_file, ctx)[:cfg.max_train_rows or None]
    self.valid = read_choice(cfg.validation_file, ctx)
    self.num_choices = max(len(r.second) for r in train)
    return (featurize_choice(train, tokenizer, cfg.max_seq_length, self.num_choices),
            featurize_choice(self.valid, tokenizer, cfg.max_seq_length, self.num_choices))

  def _masked(self, logits, batch):
    import jax.numpy as jnp
    return jnp.where(batch["choice_mask"] > 0, logits, -1e9)

  def loss(self, logits, batch):
    return _masked_ce(self._masked(logits, batch), batch["labels"], batch["weight"])

  def predict(self, logits, batch):
    return {"prediction": self._masked(logits, batch).argmax(-1)}

  def score(self, feats, out):
    from bert_jax.finetune import metrics
    return {"accuracy": metrics.accuracy(feats.arrays["labels"], out["prediction"])}

  def write_predictions(self, out_dir, feats, out) -> str:
    path = os.path.join(out_dir, "predictions.tsv")
    lines = ["id\tprediction\tlabel"] + [f"{r.id}\t{int(p)}\t{r.label}"
                                          for r, p in zip(self.valid, out["prediction"])]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


# --max-answer-length default per language: SQuAD's 30 tokens; Chinese answers are counted in
# characters (one token each) and run longer: 50 keeps 98.8% of CMRC 2018 dev's (30 keeps 94%).
DEFAULT_MAX_ANSWER_LENGTH = {"en": 30, "zh": 50}


class QATask(Task):
  """Span QA through bert_jax.finetune.qa (featurisation, n-best) and squad_eval (EM/F1)."""
  name, architecture, main_metric = "qa", "BertForQuestionAnswering", "f1"
  seq_outputs = ("start_logits", "end_logits")

  def load(self, tokenizer):
    from bert_jax.finetune import qa
    cfg = self.cfg
    kw = dict(max_seq_length=cfg.max_seq_length, doc_stride=cfg.doc_stride,
              max_query_length=cfg.max_query_length)
    ctx = cfg.context_file
    train = read_qa(cfg.train_file, ctx)[:cfg.max_train_rows or None]
    self.valid = read_qa(cfg.validation_file, ctx)
    # in tokens, a Chinese character being one: the default by the contexts' language
    self.max_answer_length = (cfg.max_answer_length or
                              DEFAULT_MAX_ANSWER_LENGTH[squad_eval.detect_language(train)])
    train_f = qa.featurize(train, tokenizer, is_training=True, **kw)
    self.valid_qa = qa.featurize(self.valid, tokenizer, is_training=False, **kw)
    for features, path in ((train_f, cfg.train_file), (self.valid_qa, cfg.validation_file)):
      for note in qa.coverage_warnings(features, path, max_answer_length=self.max_answer_length,
                                       max_seq_length=cfg.max_seq_length,
                                       doc_stride=cfg.doc_stride):
        warnings.warn(note, stacklevel=2)

    def as_features(f):  # with answer positions: validation's for its loss
      arrays = {k: np.asarray(getattr(f, k), np.int32)
                for k in ("input_ids", "token_type_ids", "attention_mask", "start_positions",
                          "end_positions")}
      return Features(arrays, arrays["attention_mask"].sum(-1).astype(np.int32))
    return as_features(train_f), as_features(self.valid_qa)

  def loss(self, logits, batch):
    start, end = logits
    w = batch["weight"]
    return (_masked_ce(start, batch["start_positions"], w)
            + _masked_ce(end, batch["end_positions"], w)) / 2

  def predict(self, logits, batch):
    return {"start_logits": logits[0], "end_logits": logits[1]}

  def answers(self, out) -> dict[str, str]:
    from bert_jax.finetune import qa
    cfg = self.cfg
    return qa.postprocess(self.valid, self.valid_qa, out["start_logits"], out["end_logits"],
                          n_best=cfg.n_best, max_answer_length=self.max_answer_length,
                          version_2_with_negative=cfg.version_2_with_negative,
                          null_score_diff_threshold=cfg.null_score_diff_threshold)

  def score(self, feats, out):
    from bert_jax.finetune import squad_eval
    self._answers = self.answers(out)
    return dict(squad_eval.evaluate(self.valid, self._answers, lang="auto"))

  def write_predictions(self, out_dir, feats, out) -> str:
    path = os.path.join(out_dir, "predictions.json")
    answers = getattr(self, "_answers", None) or self.answers(out)
    write_text_atomic(path, json.dumps(answers, ensure_ascii=False, indent=1) + "\n")
    return path


TASKS = {"classification": ClassificationTask, "token": TokenTask, "qa": QATask,
         "choice": ChoiceTask}


