"""Where a jitted step's device time goes: a jax.profiler trace of a few steps, summarised per
kernel and per kind of kernel, small enough to come back from a lent GPU in a JSON.

  from kernel_profile import profile_steps
  summary = profile_steps(step, steps=3)      # step() runs one step and waits for it

  python tools/kernel_profile.py TRACE_DIR --steps 3   # summarise a trace taken elsewhere

Device events are the kernels on a GPU's streams or the ops on a TPU core's "XLA Ops" line; a
CPU has neither, so there the XLA thunks on its compute threads stand in (tools/device_check.sh --cpu
runs this path in CI). Kinds, by the HLO op or kernel name:
  matmul      gemms, dots, cuBLAS / cuDNN gemm kernels (on a CPU, XNNPACK's fusions)
  attention   this project's Pallas kernels, cuDNN / splash flash attention
  copy        copies, transposes, memcpy / memset
  collective  all-reduce, all-gather, reduce-scatter, NCCL
  other       everything else: the elementwise and reduction fusions, RNG, scatters
"busy" is the union of kernel intervals, so overlapping streams count once; "idle" is the rest
of the traced span (launch gaps, host waits).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

KINDS = (
    ("attention", re.compile(r"_fwd_kernel|_dq_kernel|_dkv_kernel|flash|fmha|cudnn.*attn|splash",
                             re.I)),
    ("matmul", re.compile(r"gemm|\bdot|dot_general|cublas|xmma|nvjet|cutlass|convolution|"
                          r"ynn_fusion", re.I)),  # ynn: XLA CPU's dot fusions
    ("collective", re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|nccl|"
                              r"collective", re.I)),
    ("copy", re.compile(r"copy|transpose|memcpy|memset", re.I)),
)


def kind_of(name: str) -> str:
  for kind, pattern in KINDS:
    if pattern.search(name):
      return kind
  return "other"


def _device_events(trace: dict) -> list[dict]:
  events = trace.get("traceEvents", [])
  processes = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  thread = lambda e: threads.get((e["pid"], e["tid"]), "")
  device = [e for e in complete if processes.get(e["pid"], "").startswith("/device:")]
  # A GPU's kernels are on its stream lines; a TPU's ops on "XLA Ops". The other device lines
  # (XLA Modules, Steps, framework ops) are derived from them and would count them twice.
  if device:
    return ([e for e in device if thread(e).startswith("Stream")]
            or [e for e in device if thread(e) == "XLA Ops"] or device)
  return [e for e in complete  # a CPU: XLA's thunks on its compute threads
          if thread(e).startswith("tf_XLA") and "::" not in e["name"]
          and not e["name"].startswith("end: ")]


def _busy_us(events: list[dict]) -> tuple[float, float]:
  """(union of the intervals, span from first start to last end), in microseconds."""
  intervals = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events)
  busy, end = 0.0, None
  for start, stop in intervals:
    if end is None or start > end:
      busy += stop - start
      end = stop
    elif stop > end:
      busy += stop - end
      end = stop
  return busy, max(stop for _, stop in intervals) - intervals[0][0] if intervals else 0.0


def summarize(trace: dict, steps: int, top: int = 25) -> dict:
  """Per step: milliseconds busy and idle, per kind, and the `top` kernels by time (name as
  the HLO op where the trace gives one, calls per step)."""
  events = _device_events(trace)
  if not events:
    return dict(error="the trace holds no device or XLA events")
  per_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  per_kind: dict[str, float] = collections.Counter()
  for e in events:
    args = e.get("args") or {}
    name = args.get("hlo_op") or e["name"]
    per_name[name][0] += float(e["dur"])
    per_name[name][1] += 1
    per_kind[kind_of(f"{name} {e['name']}")] += float(e["dur"])
  busy, span = _busy_us(events)
  ms = lambda us: round(us / 1000.0 / steps, 3)
  ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])
  return dict(
      steps=steps, kernels_per_step=round(len(events) / steps, 1),
      busy_ms=ms(busy), idle_ms=ms(max(span - busy, 0.0)),
      kinds_ms={k: ms(v) for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
      top=[dict(name=name, kind=kind_of(name), ms=ms(total), calls=round(calls / steps, 1))
           for name, (total, calls) in ranked[:top]])


def load_trace(trace_dir: str) -> dict:
  paths = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"{trace_dir}: no plugins/profile/*/*.trace.json.gz in it")
  with gzip.open(paths[-1], "rt", encoding="utf-8") as f:
    return json.load(f)


def profile_steps(step, steps: int = 3, top: int = 25) -> dict:
  """Trace `steps` calls of step() (each waits for its step) and summarise them."""
  import jax
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        step()
    return summarize(load_trace(trace_dir), steps, top)


def format_summary(summary: dict) -> str:
  if "error" in summary:
    return f"profile: {summary['error']}"
  kinds = ", ".join(f"{k} {v:.2f}" for k, v in summary["kinds_ms"].items())
  return (f"profile per step: busy {summary['busy_ms']:.2f} ms, idle {summary['idle_ms']:.2f} ms, "
          f"{summary['kernels_per_step']:.0f} kernels; {kinds} (ms)")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("trace_dir", help="the log_dir a jax.profiler trace was written to")
  parser.add_argument("--steps", type=int, default=1, help="steps the trace holds")
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args(argv)
  try:
    summary = summarize(load_trace(args.trace_dir), args.steps, args.top)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_summary(summary))
  for row in summary.get("top", []):
    print(f"{row['ms']:9.3f} ms {row['calls']:6.1f}x  {row['kind']:<10} {row['name']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
