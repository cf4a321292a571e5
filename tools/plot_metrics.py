"""Learning curves from a pretraining workdir's metrics.jsonl, as one PNG.

  python tools/plot_metrics.py WORKDIR/metrics.jsonl [OUT.png]     (default: beside the jsonl)

Left panel: loss (total and MLM; eval rows as markers). Right panel: MLM and NSP accuracy.
A dashed vertical line marks each phase boundary (the first step of a new phase / seq_len).
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
  fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(metrics_jsonl))) or "metrics")
  fig.tight_layout()

  out_dir = os.path.dirname(os.path.abspath(out_png))
  os.makedirs(out_dir, exist_ok=True)
  tmp = os.path.join(out_dir, f".{os.path.basename(out_png)}.tmp.png")
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, out_png)  # atomic: a half-written PNG never has the final name
  return out_png


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("metrics_jsonl", help="a workdir's metrics.jsonl (or the workdir)")
  parser.add_argument("out_png", nargs="?", help="default: learning_curves.png beside it")
  args = parser.parse_args(argv)
  path = args.metrics_jsonl
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  if not os.path.isfile(path):
    print(f"error: {path}: no such file; expected a metrics.jsonl", file=sys.stderr)
    return 2
  out = args.out_png or os.path.join(os.path.dirname(os.path.abspath(path)),
                                     "learning_curves.png")
  try:
    print(plot_metrics(path, out))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
