"""What a fine-tuning run leaves in --output-dir, and the checks made on it before any work.

metrics.json carries `status`: "incomplete" from the first evaluation on (a run killed or
stopped by SIGTERM leaves it so, with `stopped_at_step` of `total_steps`), "complete" only once
the run has finished. A complete output directory is never replaced without
--overwrite-output-dir; an incomplete one is (a rerun is how a stopped fine-tune continues).
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

from bert_jax.errors import UserError
from bert_jax.storage.fileio import check_writable

METRICS = "metrics.json"
COMPLETE, INCOMPLETE = "complete", "incomplete"
EXIT_STOPPED = 143  # 128 + SIGTERM: stopped on request, the output is marked incomplete


def read_status(output_dir: str | os.PathLike) -> dict | None:
  """The metrics.json of an earlier run (None without one); a metrics.json without a status
  (written before there was one) or that cannot be read counts as complete."""
  path = pathlib.Path(output_dir) / METRICS
  if not path.is_file():
    return None
  try:
    metrics = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    metrics = None
  return metrics if isinstance(metrics, dict) else {"status": COMPLETE}


def check_output_dir(output_dir: str, overwrite: bool) -> None:
  """Refuses an --output-dir that holds a finished run, unless `overwrite`; a stopped run's
  output is replaced with a warning."""
  earlier = read_status(output_dir)
  if earlier is None or overwrite:
    return
  if earlier.get("status", COMPLETE) == COMPLETE:
    raise UserError(f"--output-dir {output_dir}: holds a finished fine-tuning run ({METRICS}, "
                    "best/, predictions); give --overwrite-output-dir to replace it, or choose "
                    "another --output-dir")
  warnings.warn(f"--output-dir {output_dir}: replacing an incomplete run (stopped at step "
                f"{earlier.get('stopped_at_step', '?')} of {earlier.get('total_steps', '?')})",
                stacklevel=2)


def check_export_hf(export_hf: str, output_dir: str) -> None:
  """--export-hf must be writable, new or empty, and apart from --output-dir (which the run
  fills: an export inside it, or around it, would find its directory not empty at the end)."""
  check_writable(export_hf, "--export-hf")
  export, output = pathlib.Path(export_hf).resolve(), pathlib.Path(output_dir).resolve()
  if export == output or output in export.parents or export in output.parents:
    where = ("is" if export == output else "is inside" if output in export.parents
             else "contains")
    raise UserError(f"--export-hf {export_hf}: {where} --output-dir {output_dir}; expected a "
                    "directory of its own")
  if export.exists() and (not export.is_dir() or any(export.iterdir())):
    raise UserError(f"--export-hf {export_hf}: already exists and is not empty")
