"""A GPU train step's lower bound, read from the program XLA compiles for it, with no GPU.

  python tools/gpu_roofline.py --config configs/bert_base_paper.py --topology h200:1 \\
      --phase 1 --attention xla pallas [--top 12] [--json-out roofline.json]

For each attention path the step is compiled as `bert-jax plan` compiles it (devices/
gpu_targets.py describes the GPU). Each kernel of the compiled program (a fusion, a library or
Pallas call, a copy) moves at least the bytes of its distinct operands and its result, and a
fusion holding a matmul does its FLOPs; the larger of bytes / HBM bandwidth and FLOPs / peak is
the kernel's bound, and the step's is their sum. Kernels are grouped by what they make (a
fusion's kind and its result's shape), most costly first, and each path's total is printed
with its ratio to the first path's.

A bound to compare programs by, not a forecast of their speed: it takes every kernel to run at
the roofline; a Pallas kernel's FLOPs are not in its call (only its bytes count), nor is its
integer work; an operand a kernel reads in part (a block of it, or a buffer it writes in place)
counts whole, and a loop's body once. What it shows well is traffic that a change adds or
removes: a slice, a transpose, a copy.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(
    r"\s+(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([a-z][\w\-]*)\((.*?)\)(.*)$")
_NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast",
                "after-all", "partition-id", "replica-id"}
_DOT = re.compile(r"= (\S+) dot\(%([\w.\-]+), %[\w.\-]+\).*?lhs_contracting_dims=\{([\d,]*)\}")


def _arrays(types: str) -> list[tuple[str, list[int]]]:
  """(dtype, shape) of each array in an instruction's type (one, or a tuple's)."""
  return [(dtype, [int(d) for d in dims.split(",") if d])
          for dtype, dims in _ARRAY.findall(types)]


def _nbytes(types: str) -> int:
  return sum(_BYTES[dtype] * math.prod(shape) for dtype, shape in _arrays(types))


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """The instruction lines of each computation, and the entry computation's name."""
  comps, entry, name = {}, None, None
  for line in hlo.splitlines():
    header = re.match(r"(ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header and not line.startswith(" "):
      name = header.group(2)
      comps[name] = []
      entry = name if header.group(1) else entry
    elif name and line.startswith("  "):
      comps[name].append(line)
  return comps, entry


def _dot_flops(comps: dict, name: str) -> float:
  """2·M·N·K of the dots in a computation and the computations it calls."""
  lines = comps.get(name, [])
  types = {m.group(1): m.group(2) for m in map(_INSTRUCTION.match, lines) if m}
  flops = 0.0
  for line in lines:
    dot = _DOT.search(line)
    if dot:
      (_, out), (_, lhs) = _arrays(dot.group(1))[0], _arrays(types[dot.group(2)])[0]
      flops += 2 * math.prod(out) * math.prod(lhs[int(c)] for c in dot.group(3).split(",") if c)
    for called in re.findall(r"(?:calls|body)=%([\w.\-]+)", line):
      flops += _dot_flops(comps, called)
  return flops


def kernels(hlo: str) -> list[dict]:
  """Each kernel of the compiled program's entry computation (and of its loops' bodies, once):
  its name, kind, result, bytes moved and matmul FLOPs."""
  comps, entry = _computations(hlo)
  out = []

  def walk(name: str):
    lines = comps[name]
    types = {m.group(1): m.group(2) for m in map(_INSTRUCTION.match, lines) if m}
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m or m.group(3) in _NOT_KERNELS:
        continue
      result, op, rest = m.group(2), m.group(3), m.group(5)
      if op == "while":
        walk(re.search(r"body=%([\w.\-]+)", rest).group(1))
        continue
      operands = dict.fromkeys(re.findall(r"%([\w.\-]+)", m.group(4)))
      # a buffer written in place (output_to_operand_aliasing) is counted once, as the result
      aliased = set(re.findall(r"\{[\d,]*\}: \((\d+)", rest))
      moved = _nbytes(result) + sum(_nbytes(types.get(o, "")) for i, o in enumerate(operands)
                                    if str(i) not in aliased)
      called = re.search(r"calls=%([\w.\-]+)", rest)
      kind = re.sub(r"(\.\d+)+$", "", m.group(1)) if op == "fusion" else op
      if "xla.gpu.triton" in rest and op == "custom-call":
        kind = "pallas_call"
      out.append(dict(name=m.group(1), kind=kind, result=re.sub(r"\{[^}]*\}", "", result),
                      bytes=moved, flops=_dot_flops(comps, called.group(1)) if called else 0.0))

  walk(entry)
  return out


def bound(rows: list[dict], bandwidth: float, peak: float) -> dict:
  """The step's roofline: per kernel max(bytes / bandwidth, FLOPs / peak), summed; and the
  same per group of kernels (kind and result), most costly first."""
  groups = collections.defaultdict(lambda: dict(kernels=0, ms=0.0, gb=0.0))
  for row in rows:
    ms = 1e3 * max(row["bytes"] / bandwidth, row["flops"] / peak)
    group = groups[f"{row['kind']} {row['result'][:60]}"]
    group["kernels"] += 1
    group["ms"] += ms
    group["gb"] += row["bytes"] / 1e9
  ranked = sorted(groups.items(), key=lambda kv: -kv[1]["ms"])
  return dict(kernels=len(rows), ms=sum(g["ms"] for g in groups.values()),
              gb=sum(row["bytes"] for row in rows) / 1e9,
              tflop=sum(row["flops"] for row in rows) / 1e12,
              groups=[dict(group=k, **v) for k, v in ranked])


def compile_step(config: str, overrides: list[tuple[str, str]], target, phase: int):
  """The compiled train step of `phase` (1-based) for a plan target, as `bert-jax plan`
  compiles it."""
  from bert_jax.pretraining import plan
  from bert_jax.pretraining.run_config import resolve_config
  _, phases, _, pretraining = plan.setup(resolve_config(config, overrides), target.devices)
  return pretraining.lower_train_step(phases[phase - 1]).compile()


def _main(argv=None) -> int:
  from bert_jax.devices import gpu_targets
  from bert_jax.errors import UserError
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--topology", default="h200:1", help="a GPU one: h100:8, h200:1, ...")
  p.add_argument("--phase", type=int, default=1)
  p.add_argument("--attention", nargs="+", default=["xla", "pallas"])
  p.add_argument("--top", type=int, default=12, help="groups of kernels printed per path")
  p.add_argument("--json-out")
  args, rest = p.parse_known_args(argv)
  parsed = gpu_targets.parse(args.topology)
  if not parsed:
    raise UserError(f"--topology {args.topology}: expected a GPU one such as h200:1")
  from bert_jax.pretraining import plan
  from bert_jax.pretraining.run_config import parse_overrides, resolve_config
  overrides = parse_overrides(rest)
  # a bad config or phase says so before the target loads and the compiles start
  count = len(plan.make_phases(resolve_config(args.config, overrides)))
  if not 1 <= args.phase <= count:
    raise UserError(f"--phase {args.phase}: expected 1 to {count} ({args.config}'s phases)")
  target = plan.load_target(args.topology)
  report = []
  for attention in args.attention:
    compiled = compile_step(args.config, overrides + [("model.attention", attention)],
                            target, args.phase)
    result = dict(attention=attention, **bound(kernels(compiled.as_text()),
                                                gpu_targets.GPUS[parsed[0]].bandwidth,
                                                target.peak_flops))
    report.append(result)
    ratio = f", {result['ms'] / report[0]['ms']:.3f}x {report[0]['attention']}"
    print(f"\n{attention}: {result['kernels']} kernels, bound {result['ms']:.2f} ms"
          f"{ratio if len(report) > 1 else ''}; {result['gb']:.1f} GB moved, "
          f"{result['tflop']:.1f} TFLOP in matmul fusions")
    for g in result["groups"][:args.top]:
      print(f"  {g['ms']:8.3f} ms {g['kernels']:4d} x  {g['gb']:7.2f} GB  {g['group']}")
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  return 0


def main(argv=None) -> int:
  """A bad flag or config: one line, exit 2 (bert_jax.errors.cli_entry)."""
  from bert_jax.errors import cli_entry
  return cli_entry(_main)(argv)


if __name__ == "__main__":
  sys.exit(main())
