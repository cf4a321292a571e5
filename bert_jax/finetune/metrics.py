"""Fine-tuning metrics in numpy: accuracy, F1, Matthews correlation, Pearson/Spearman, and
entity-level F1 for BIO/IOBES tagging (the chunking rules of conlleval, as seqeval's default).

All scores are fractions in [0, 1] (QA's EM/F1 live in squad_eval on the 0-100 scale).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def accuracy(labels, predictions) -> float:
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  return float(np.mean(labels == predictions)) if labels.size else 0.0


def _confusion(labels, predictions, num_classes: int) -> np.ndarray:
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
  return cm


def _safe_div(a, b):
  return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b != 0)


def f1(labels, predictions, average: str = "binary", positive: int = 1,
       num_classes: int | None = None) -> float:
  """F1 of the positive class ("binary"), the unweighted class mean ("macro") or "micro"."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  if num_classes is None:
    num_classes = int(max(labels.max(initial=0), predictions.max(initial=0), positive)) + 1
  cm = _confusion(labels, predictions, num_classes)
  tp = np.diag(cm).astype(np.float64)
  fp = cm.sum(axis=0) - tp
  fn = cm.sum(axis=1) - tp
  if average == "micro":
    return float(_safe_div(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()))
  per_class = _safe_div(2 * tp, 2 * tp + fp + fn)
  if average == "binary":
    return float(per_class[positive])
  if average == "macro":
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0  # as sklearn: labels seen in either
    return float(per_class[present].mean()) if present.any() else 0.0
  raise ValueError(f"unknown average {average!r}")


def matthews_corrcoef(labels, predictions) -> float:
  """Multi-class MCC (Gorodkin's R_K); 0 when a marginal is constant."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  num_classes = int(max(labels.max(initial=0), predictions.max(initial=0))) + 1
  cm = _confusion(labels, predictions, num_classes).astype(np.float64)
  t_k, p_k = cm.sum(axis=1), cm.sum(axis=0)
  c, s = np.trace(cm), cm.sum()
  denominator = np.sqrt(s * s - p_k @ p_k) * np.sqrt(s * s - t_k @ t_k)
  return float((c * s - t_k @ p_k) / denominator) if denominator else 0.0


def pearson(x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x - x.mean(), y - y.mean()
  denominator = np.sqrt((x * x).sum() * (y * y).sum())
  return float((x * y).sum() / denominator) if denominator else 0.0


def _average_ranks(x) -> np.ndarray:
  """Ranks 1..n with ties given their mean rank."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="mergesort")
  sorted_x = x[order]
  # Start of each run of equal values, and the run's mean 1-based rank.
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], len(x)]
  run_rank = (starts + ends + 1) / 2.0
  ranks = np.empty(len(x))
  ranks[order] = np.repeat(run_rank, ends - starts)
  return ranks


def spearman(x, y) -> float:
  return pearson(_average_ranks(x), _average_ranks(y))


# -- entity-level tagging F1 ------------------------------------------------------------------

def _split_tag(tag: str) -> tuple[str, str]:
  if tag in ("O", "") or tag is None:
    return "O", ""
  if len(tag) > 1 and tag[1] in "-_" and tag[0] in "BIESLU":
    return tag[0], tag[2:]
  return "I", tag  # a bare type (IO tagging) is inside a chunk of that type


def _chunk_ends(prev_prefix, prev_type, prefix, type_) -> bool:
  if prev_prefix in ("E", "S", "L", "U"):
    return True
  if prev_prefix == "O":
    return False
  return prefix in ("B", "S", "O", "U") or type_ != prev_type


def _chunk_starts(prev_prefix, prev_type, prefix, type_) -> bool:
  if prefix in ("B", "S", "U"):
    return True
  if prefix == "O":
    return False
  return prev_prefix in ("E", "S", "O", "L", "U") or type_ != prev_type


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
  """(type, first, last) chunks of one tag sequence, conlleval's lenient rules: an I- after O
  or after another type starts a chunk."""
  entities = []
  prev_prefix, prev_type, start = "O", "", None
  for i, tag in enumerate(list(tags) + ["O"]):
    prefix, type_ = _split_tag(tag)
    if start is not None and _chunk_ends(prev_prefix, prev_type, prefix, type_):
      entities.append((prev_type, start, i - 1))
      start = None
    if _chunk_starts(prev_prefix, prev_type, prefix, type_):
      start = i
    prev_prefix, prev_type = prefix, type_
  return entities


def entity_scores(true_tags: Sequence[Sequence[str]],
                  pred_tags: Sequence[Sequence[str]]) -> dict[str, float]:
  """Micro precision/recall/F1 over exact (type, span) chunk matches, plus token accuracy."""
  n_true = n_pred = n_correct = tokens = tokens_right = 0
  for sentence, (gold, pred) in enumerate(zip(true_tags, pred_tags)):
    if len(gold) != len(pred):
      raise ValueError(f"sentence {sentence}: {len(gold)} gold tags but {len(pred)} predicted")
    gold_chunks = set(get_entities(gold))
    pred_chunks = set(get_entities(pred))
    n_true += len(gold_chunks)
    n_pred += len(pred_chunks)
    n_correct += len(gold_chunks & pred_chunks)
    tokens += len(gold)
    tokens_right += sum(g == p for g, p in zip(gold, pred))
  precision = n_correct / n_pred if n_pred else 0.0
  recall = n_correct / n_true if n_true else 0.0
  f1_score = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1_score,
          "accuracy": tokens_right / tokens if tokens else 0.0}


def classification_scores(labels, predictions, num_classes: int) -> dict[str, float]:
  """accuracy, f1 (binary: of label index 1; otherwise macro) and mcc."""
  average = "binary" if num_classes == 2 else "macro"
  return {"accuracy": accuracy(labels, predictions),
          "f1": f1(labels, predictions, average=average, num_classes=num_classes),
          "mcc": matthews_corrcoef(labels, predictions)}


def regression_scores(labels, predictions) -> dict[str, float]:
  return {"pearson": pearson(labels, predictions), "spearman": spearman(labels, predictions)}
