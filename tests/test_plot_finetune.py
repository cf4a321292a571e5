"""Fine-tuning curves: a real (tiny) fine-tune's metrics.json history carries the train and
validation loss at every evaluation beside the task's metrics, and tools/plot_metrics.py draws
exactly those series."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

from bert_jax.finetune.__main__ import main

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import plot_metrics  # noqa: E402  (tools/ is not a package)

CHARS = "我要去北京他在上海你们的是不了人有这个中来大为和国地到以说时"


@pytest.fixture(scope="module")
def slot_run(tmp_path_factory):
  """Slot tagging (JSON) for 2 epochs of 4 updates, evaluated every 3 updates: evaluations at
  steps 3, 6 and 8 (the end)."""
  d = tmp_path_factory.mktemp("slots")
  vocab = d / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHARS]) + "\n",
                   encoding="utf-8")
  rows = [{"tokens": list("我要去北京"), "tags": ["O", "O", "O", "B-loc", "I-loc"], "id": "a"},
          {"tokens": list("他在上海"), "tags": ["O", "O", "B-loc", "I-loc"], "id": "b"},
          {"tokens": list("你们去中国"), "tags": ["O", "O", "O", "B-loc", "I-loc"], "id": "c"},
          {"tokens": list("我说大"), "tags": ["O", "O", "O"], "id": "d"}] * 4
  data = d / "slots.json"
  data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
  out = d / "out"
  assert main(["--task", "token", "--init", "random", "--preset", "tiny", "--vocab", str(vocab),
               "--train-file", str(data), "--validation-file", str(data), "--output-dir",
               str(out), "--epochs", "2", "--batch-size", "4", "--eval-every", "3",
               "--eval-batch-size", "3", "--max-seq-length", "16", "--learning-rate", "1e-3",
               "--quiet"]) == 0
  return out


def test_history_has_the_validation_loss_at_every_evaluation(slot_run):
  metrics = json.loads((slot_run / "metrics.json").read_text(encoding="utf-8"))
  history = metrics["history"]
  assert [h["step"] for h in history] == [3, 6, 8]
  for h in history:
    assert h["validation_loss"] > 0 and h["train_loss"] > 0
    assert {"f1", "accuracy", "joint_accuracy"} <= set(h)
  assert metrics["validation_loss"] == next(h["validation_loss"] for h in history
                                            if h["step"] == metrics["step"])


def test_plot_draws_the_runs_series(slot_run, tmp_path):
  history = json.loads((slot_run / "metrics.json").read_text(encoding="utf-8"))["history"]
  series = plot_metrics.finetune_series(str(slot_run / "metrics.json"))
  assert {"train_loss", "validation_loss", "f1", "precision", "recall", "accuracy",
          "joint_accuracy"} <= set(series)
  assert not {"epoch", "step", "count"} & set(series)
  for name, (steps, values) in series.items():
    assert steps == [h["step"] for h in history]
    assert values == [h[name] for h in history]
  out = tmp_path / "curves.png"
  assert plot_metrics.main([str(slot_run), str(out)]) == 0  # the directory finds metrics.json
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_refuses_a_metrics_json_without_history(tmp_path):
  bad = tmp_path / "metrics.json"
  bad.write_text('{"status": "complete", "history": []}')
  with pytest.raises(ValueError, match="no 'history'"):
    plot_metrics.finetune_series(str(bad))
  assert plot_metrics.main([str(bad)]) == 2
