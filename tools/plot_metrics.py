"""Learning curves, as one PNG, of a pretraining workdir's metrics.jsonl or of a fine-tuning
--output-dir's metrics.json.

  python tools/plot_metrics.py WORKDIR/metrics.jsonl [OUT.png]     (default: beside the file)
  python tools/plot_metrics.py OUTPUT_DIR/metrics.json [OUT.png]   (or just the directory)

Pretraining: left panel loss (total and MLM; eval rows as markers), right panel MLM and NSP
accuracy; a dashed vertical line marks each phase boundary (the first step of a new phase /
seq_len). Fine-tuning: left panel the train loss (averaged since the previous evaluation) and
the validation loss at every evaluation, right panel the task's metrics (accuracy, F1, EM, ...)
against the optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

LOSS_KEYS = ("loss", "mlm_loss")
ACCURACY_KEYS = ("mlm_accuracy", "nsp_accuracy")
FINETUNE_LOSS_KEYS = ("train_loss", "validation_loss")
NOT_A_CURVE = ("epoch", "step", "count")  # a fine-tuning record's bookkeeping


def read_rows(metrics_jsonl: str) -> list[dict]:
  """Rows that carry a step; a torn last line (a run killed mid-write) is skipped."""
  rows = []
  with open(metrics_jsonl, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and "step" in row:
        rows.append(row)
  return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  pairs = sorted((int(r["step"]), float(r[key])) for r in rows
                 if isinstance(r.get(key), (int, float)))
  return [s for s, _ in pairs], [v for _, v in pairs]


def phase_boundaries(rows: list[dict]) -> list[tuple[int, str]]:
  """(step, label) where each phase after the first begins, from the train rows.

  A row's step counts the updates done, and the loop logs the last step of every phase, so the
  boundary is the step of the previous phase's last row. Labels count phases from 1 (the rows'
  "phase" field is the 0-based index), as the loop's progress lines do.
  """
  marks, previous, previous_step = [], None, None
  for row in sorted(rows, key=lambda r: int(r["step"])):
    key = (row.get("phase"), row.get("seq_len"))
    if key == (None, None):
      continue
    if previous is not None and key != previous:
      index = key[0] + 1 if isinstance(key[0], int) else key[0]
      label = f"phase {index}" + (f" (seq {key[1]})" if key[1] is not None else "")
      marks.append((previous_step, label))
    previous, previous_step = key, int(row["step"])
  return marks


def plot_metrics(metrics_jsonl: str, out_png: str) -> str:
  """Writes the learning-curve PNG for `metrics_jsonl` to `out_png`; returns out_png."""
  rows = read_rows(metrics_jsonl)
  if not rows:
    raise ValueError(f"{metrics_jsonl}: no metric rows with a 'step'")
  train = [r for r in rows if r.get("split", "train") != "eval"]
  evals = [r for r in rows if r.get("split") == "eval"]

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, keys, title in ((ax_loss, LOSS_KEYS, "loss"), (ax_acc, ACCURACY_KEYS, "accuracy")):
    for key in keys:
      steps, values = _series(train, key)
      if steps:
        line, = ax.plot(steps, values, label=f"train {key}", linewidth=1.2)
        eval_steps, eval_values = _series(evals, key)
        if eval_steps:
          ax.plot(eval_steps, eval_values, "o--", color=line.get_color(), markersize=4,
                  linewidth=0.8, label=f"eval {key}")
      else:
        eval_steps, eval_values = _series(evals, key)
        if eval_steps:
          ax.plot(eval_steps, eval_values, "o--", markersize=4, label=f"eval {key}")
    for step, label in phase_boundaries(train or rows):
      ax.axvline(step, color="gray", linestyle=":", linewidth=1)
      ax.text(step, 0.98, f" {label}", transform=ax.get_xaxis_transform(), va="top",
              fontsize=8, color="gray")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  ax_acc.set_ylim(0.0, 1.0)
  _save(fig, metrics_jsonl, out_png)
  return out_png


def finetune_series(metrics_json: str) -> dict[str, tuple[list[int], list[float]]]:
  """Each curve of a fine-tuning run's metrics.json history, by name: train_loss,
  validation_loss and the task's metrics, as (steps, values)."""
  with open(metrics_json, encoding="utf-8") as f:
    try:
      metrics = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{metrics_json}: not valid JSON ({e.msg})") from None
  history = metrics.get("history") if isinstance(metrics, dict) else None
  rows = [r for r in history or [] if isinstance(r, dict) and "step" in r]
  if not rows:
    raise ValueError(f"{metrics_json}: no 'history' of evaluations with a 'step'")
  names = dict.fromkeys(k for r in rows for k, v in r.items()
                        if k not in NOT_A_CURVE and isinstance(v, (int, float))
                        and not isinstance(v, bool))
  return {k: _series(rows, k) for k in names}


def plot_finetune(metrics_json: str, out_png: str) -> str:
  """Writes the fine-tuning curves of `metrics_json` to `out_png`; returns out_png."""
  series = finetune_series(metrics_json)
  fig, (ax_loss, ax_task) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name, (steps, values) in series.items():
    ax = ax_loss if name in FINETUNE_LOSS_KEYS else ax_task
    ax.plot(steps, values, "o-", markersize=4, linewidth=1.2, label=name)
  for ax, title in ((ax_loss, "loss"), (ax_task, "validation metrics")):
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  _save(fig, metrics_json, out_png)
  return out_png


def _save(fig, source: str, out_png: str) -> None:
  fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(source))) or "metrics")
  fig.tight_layout()
  out_dir = os.path.dirname(os.path.abspath(out_png))
  os.makedirs(out_dir, exist_ok=True)
  tmp = os.path.join(out_dir, f".{os.path.basename(out_png)}.tmp.png")
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, out_png)  # atomic: a half-written PNG never has the final name


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("metrics", help="a pretraining workdir's metrics.jsonl, a fine-tuning "
                                      "output dir's metrics.json, or either directory")
  parser.add_argument("out_png", nargs="?", help="default: learning_curves.png beside it")
  args = parser.parse_args(argv)
  path = args.metrics
  if os.path.isdir(path):
    jsonl = os.path.join(path, "metrics.jsonl")
    path = jsonl if os.path.isfile(jsonl) else os.path.join(path, "metrics.json")
  if not os.path.isfile(path):
    print(f"error: {path}: no such file; expected a metrics.jsonl or metrics.json",
          file=sys.stderr)
    return 2
  out = args.out_png or os.path.join(os.path.dirname(os.path.abspath(path)),
                                     "learning_curves.png")
  plot = plot_metrics if path.endswith(".jsonl") else plot_finetune
  try:
    print(plot(path, out))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
