"""Metrics out of the pretraining loop: metrics.jsonl, TensorBoard event files, a progress line.

Only process 0 writes (`enabled=False` elsewhere). Every row of metrics.jsonl is one flat JSON
object carrying step, phase, seq_len and split ("train" or "eval"), so a plot is a few lines:

  rows = [json.loads(l) for l in open("metrics.jsonl")]
  train = [r for r in rows if r["split"] == "train"]

A row with `mlm_loss` (the mean masked-LM cross-entropy: of the eval split, or averaged over a
train row's steps) also gets `mlm_perplexity = exp(mlm_loss)`, in the file, in TensorBoard and
on the progress line.

A gs:// workdir (any object store) cannot be appended to: there the rows are kept in memory
and the whole metrics.jsonl is rewritten (one atomic upload) at most every `upload_secs` and
on flush/close; TensorBoard events go to a local temporary directory (tensorboardX needs the
google-cloud-storage package for gs://) and are copied to workdir/tensorboard at the same
moments. A kill loses at most the last `upload_secs` of rows, which the resumed run rewrites.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, TextIO

from bert_jax.storage.fileio import as_path, copy_atomic, is_remote, write_text_atomic

# Printed in this order on the progress line when present.
_PROGRESS_KEYS = (("loss", "loss {:.4f}"), ("mlm_accuracy", "mlm_acc {:.3f}"),
                  ("mlm_perplexity", "mlm_ppl {:.2f}"),
                  ("nsp_accuracy", "nsp_acc {:.3f}"), ("learning_rate", "lr {:.2e}"),
                  ("grad_norm", "gnorm {:.2f}"), ("sequences_per_sec", "{:.1f} seq/s"),
                  ("mfu", "mfu {:.1%}"), ("data_wait_s", "data wait {:.3f}s"))


def perplexity(mean_loss: float) -> float:
  """exp of a mean cross-entropy in nats (inf past float range, nan stays nan)."""
  return math.exp(mean_loss) if mean_loss < 709.0 or math.isnan(mean_loss) else math.inf


def _clean(value: Any) -> Any:
  """JSON-safe scalar: numpy/jax scalars to Python, non-finite floats to None."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricWriter:
  """Appends rows to workdir/metrics.jsonl and TensorBoard scalars to workdir/tensorboard."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None,
               tensorboard: bool = True, stream: TextIO | None = None,
               upload_secs: float = 60.0):
    self.enabled = enabled
    self.remote = is_remote(workdir)
    self.path = str(as_path(workdir) / "metrics.jsonl")
    self.stream = stream if stream is not None else sys.stdout
    self.upload_secs = upload_secs
    self._tb = None
    self._file = None
    self._lines: list[str] = []      # remote: every row of metrics.jsonl
    self._dirty = False
    self._uploaded_at = time.monotonic()
    self._tb_local = None            # remote: where tensorboardX writes before the copy
    self._tb_dir = str(as_path(workdir) / "tensorboard")
    if not enabled:
      return
    as_path(workdir).mkdir(parents=True, exist_ok=True)
    if resume_step is not None:
      self.truncate_after(resume_step)
    if self.remote:
      if as_path(self.path).exists():
        self._lines = _complete_lines(as_path(self.path).read_text(encoding="utf-8"))
    else:
      self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # imported lazily: it pulls in protobuf
      if self.remote:
        self._tb_local = tempfile.mkdtemp(prefix="bert-jax-tensorboard-")
      # purge_step hides events a killed run wrote past the step we resume from.
      self._tb = SummaryWriter(self._tb_local or self._tb_dir, purge_step=resume_step,
                               flush_secs=10)

  def truncate_after(self, step: int) -> None:
    """Drops rows with step > `step` (work lost when a run died after its last checkpoint)."""
    if not as_path(self.path).exists():
      return
    lines = as_path(self.path).read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line torn by a kill
      if isinstance(row, dict) and row.get("step", 0) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
      write_text_atomic(self.path, "".join(keep))

  def write(self, step: int, metrics: dict[str, Any], *, split: str = "train",
            phase: int, seq_len: int, progress: bool = True) -> dict[str, Any]:
    """Writes one row (and TensorBoard scalars `split/key`); returns the row."""
    row = {"step": int(step), "split": split, "phase": int(phase), "seq_len": int(seq_len),
           "time": round(time.time(), 3)}
    row.update({k: _clean(v) for k, v in metrics.items()})
    if isinstance(row.get("mlm_loss"), (int, float)) and "mlm_perplexity" not in row:
      row["mlm_perplexity"] = _clean(perplexity(float(row["mlm_loss"])))
    if not self.enabled:
      return row
    line = json.dumps(row, sort_keys=False) + "\n"
    if self.remote:
      self._lines.append(line)
      self._dirty = True
      if time.monotonic() - self._uploaded_at >= self.upload_secs:
        self._upload()
    else:
      self._file.write(line)
      self._file.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key not in ("step", "split", "time") and isinstance(value, (int, float)) \
            and not isinstance(value, bool):
          self._tb.add_scalar(f"{split}/{key}", value, global_step=int(step))
    if progress:
      self.stream.write(self.progress_line(row) + "\n")
      self.stream.flush()
    return row

  @staticmethod
  def progress_line(row: dict[str, Any]) -> str:
    parts = [f"[{row['split']}] step {row['step']}", f"phase {row['phase'] + 1}",
             f"seq {row['seq_len']}"]
    for key, fmt in _PROGRESS_KEYS:
      value = row.get(key)
      if isinstance(value, (int, float)):
        parts.append(fmt.format(value))
    if row.get("skipped_steps"):
      parts.append(f"skipped {row['skipped_steps']}")
    if row.get("resumed_at_step") is not None:
      parts.append(f"mean of the {row.get('averaged_steps')} steps since the resume at "
                   f"{row['resumed_at_step']}")
    return " | ".join(parts)

  def message(self, text: str) -> None:
    if self.enabled:
      self.stream.write(text + "\n")
      self.stream.flush()

  def _upload(self) -> None:
    """Remote workdir: rewrites metrics.jsonl whole and copies the TensorBoard event files."""
    self._uploaded_at = time.monotonic()
    if self._dirty:
      write_text_atomic(self.path, "".join(self._lines))
      self._dirty = False
    if self._tb_local is not None:
      if self._tb is not None:
        self._tb.flush()
      for name in sorted(os.listdir(self._tb_local)):  # event files only, no subdirectories
        if not os.path.isfile(os.path.join(self._tb_local, name)):
          continue
        as_path(self._tb_dir).mkdir(parents=True, exist_ok=True)
        copy_atomic(os.path.join(self._tb_local, name), as_path(self._tb_dir) / name)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()
    if self.remote and self.enabled:
      self._upload()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self.remote and self.enabled:
      self._upload()
    if self._tb_local is not None:
      shutil.rmtree(self._tb_local, ignore_errors=True)
      self._tb_local = None


def _complete_lines(text: str) -> list[str]:
  """The newline-terminated lines of `text` (a torn last line is dropped)."""
  lines = text.splitlines(keepends=True)
  return [line for line in lines if line.endswith("\n")]


class IntervalMetrics:
  """The per-step metrics (device scalars) of one logging interval, averaged when logged.

  Holding device arrays keeps the loop asynchronous: nothing is fetched until `summary`.
  Throughput counts only the steps since `restart_clock` (the loop restarts it after a
  compile, an eval or a checkpoint, which are not training time). Every summary says how many
  steps it averages (`averaged_steps`); the first one after a resume also carries
  `resumed_at_step`, since it averages only the steps run since then.

  Host time, summed over the interval's steps: `data_wait_s`, the loop blocked on the next
  batch; `host_overhead_s`, the loop's time between handing one step to the devices and
  calling the next (the batch, bookkeeping; not compile, eval or checkpoint time, not the
  metrics fetch). With asynchronous dispatch the devices run queued steps meanwhile, so it
  only costs throughput as it approaches the interval's wall time.
  """

  AVERAGED = ("loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "grad_norm")

  def __init__(self, resumed_at: int | None = None):
    self.entries: list[tuple[int, dict]] = []
    self._checked = 0          # entries[:_checked] are known to be finite
    self.data_wait_s = self.host_overhead_s = 0.0
    self.resumed_at = resumed_at
    self.restart_clock()

  def restart_clock(self) -> None:
    self.clock_start = time.perf_counter()
    self.timed_steps = 0
    self._host_since = self.clock_start

  def add_data_wait(self, seconds: float) -> None:
    self.data_wait_s += seconds

  def dispatching(self) -> None:
    """Called right before the train step: host time since the last step (or the clock's
    restart) is overhead."""
    self.host_overhead_s += time.perf_counter() - self._host_since

  def add(self, step: int, metrics: dict) -> None:
    """`step`: the number of updates done after this one (the global step it leads to);
    called right after the train step returns."""
    self.entries.append((step, metrics))
    self.timed_steps += 1
    self._host_since = time.perf_counter()

  def __len__(self) -> int:
    return len(self.entries)

  def first_nonfinite_step(self) -> int | None:
    """The step of the first entry whose update was skipped as non-finite (a host sync of
    the 'finite' flags only)."""
    import jax
    pending = self.entries[self._checked:]
    flags = jax.device_get([m["finite"] for _, m in pending]) if pending else []
    for (step, _), flag in zip(pending, flags):
      if float(flag) == 0.0:
        return step
    self._checked = len(self.entries)
    return None

  def summary(self, *, sequences_per_step: int, tokens_per_step: int,
              flops_per_step: float | None = None, peak_flops: float | None = None) -> dict:
    """Averages over finite steps, the last learning rate, skipped count, throughput, MFU;
    then clears the interval (and restarts the clock)."""
    import jax
    host = jax.device_get([m for _, m in self.entries])
    elapsed = time.perf_counter() - self.clock_start
    finite = [m for m in host if float(m.get("finite", 1.0)) != 0.0]
    out: dict[str, Any] = {}
    for key in self.AVERAGED:
      if not any(key in m for m in host):
        continue   # not a metric of this objective (nsp_* of MLM-only): absent, not nan
      values = [float(m[key]) for m in finite if key in m]
      out[key] = sum(values) / len(values) if values else float("nan")
    if host and "learning_rate" in host[-1]:
      out["learning_rate"] = float(host[-1]["learning_rate"])
    out["skipped_steps"] = len(host) - len(finite)
    out["data_wait_s"], out["host_overhead_s"] = self.data_wait_s, self.host_overhead_s
    self.data_wait_s = self.host_overhead_s = 0.0
    out["averaged_steps"] = len(host)
    if self.resumed_at is not None:
      out["resumed_at_step"] = self.resumed_at
      self.resumed_at = None
    if self.timed_steps > 0 and elapsed > 0:
      steps_per_sec = self.timed_steps / elapsed
      out["steps_per_sec"] = steps_per_sec
      out["sequences_per_sec"] = steps_per_sec * sequences_per_step
      out["tokens_per_sec"] = steps_per_sec * tokens_per_step
      if flops_per_step and peak_flops:
        out["mfu"] = steps_per_sec * flops_per_step / peak_flops
    self.entries = []
    self._checked = 0
    self.restart_clock()
    return out
