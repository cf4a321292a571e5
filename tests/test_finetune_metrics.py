"""Fine-tuning metrics against sklearn/scipy on random data, and entity chunking by hand."""

from __future__ import annotations

import numpy as np
import pytest

from bert_jax.finetune import metrics

sk = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  k = 2 + seed % 3
  y = rng.integers(0, k, 200)
  p = np.where(rng.random(200) < 0.6, y, rng.integers(0, k, 200))
  assert metrics.accuracy(y, p) == pytest.approx(sk.accuracy_score(y, p))
  assert metrics.matthews_corrcoef(y, p) == pytest.approx(sk.matthews_corrcoef(y, p))
  assert metrics.f1(y, p, "macro", num_classes=k) == pytest.approx(
      sk.f1_score(y, p, average="macro"))
  assert metrics.f1(y, p, "micro", num_classes=k) == pytest.approx(
      sk.f1_score(y, p, average="micro"))
  if k == 2:
    assert metrics.f1(y, p) == pytest.approx(sk.f1_score(y, p))
    assert metrics.classification_scores(y, p, 2)["f1"] == pytest.approx(sk.f1_score(y, p))


def test_degenerate_predictions():
  y = np.array([0, 1, 1, 0])
  constant = np.zeros(4, int)
  assert metrics.matthews_corrcoef(y, constant) == sk.matthews_corrcoef(y, constant) == 0.0
  assert metrics.f1(y, constant) == 0.0
  assert metrics.accuracy(y, constant) == 0.5


@pytest.mark.parametrize("seed", range(4))
def test_correlations_match_scipy(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=150)
  y = 0.5 * x + rng.normal(size=150)
  if seed % 2:  # ties, as in STS-B's 0.2-step scores
    x, y = np.round(x, 1), np.round(y, 0)
  assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
  assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


def test_entities_bio():
  tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O", "I-ORG", "I-ORG", "B-MISC"]
  assert metrics.get_entities(tags) == [("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 5),
                                        ("ORG", 7, 8), ("MISC", 9, 9)]
  # An I- of another type starts a new chunk; IOBES singletons and ends close chunks.
  assert metrics.get_entities(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]
  assert metrics.get_entities(["S-PER", "B-LOC", "E-LOC", "I-LOC"]) == [
      ("PER", 0, 0), ("LOC", 1, 2), ("LOC", 3, 3)]


def test_entity_scores():
  gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"]]
  pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG", "O"]]
  s = metrics.entity_scores(gold, pred)
  # gold chunks 3, predicted 2 (PER right, ORG span wrong): P = 1/2, R = 1/3.
  assert s["precision"] == pytest.approx(0.5)
  assert s["recall"] == pytest.approx(1 / 3)
  assert s["f1"] == pytest.approx(0.4)
  assert s["accuracy"] == pytest.approx(5 / 7)
  with pytest.raises(ValueError):
    metrics.entity_scores([["O"]], [["O", "O"]])
