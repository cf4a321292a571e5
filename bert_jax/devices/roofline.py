"""A GPU program's lower bound, read from what XLA compiled, with no GPU: each kernel of the
program (a fusion, a library or Pallas call, a copy) moves at least the bytes of its distinct
operands and its result, and a fusion holding a matmul does its FLOPs; the larger of bytes / HBM
bandwidth and FLOPs / peak is the kernel's bound, and the step's is their sum.

A bound to compare programs by, not a forecast of their speed: it takes every kernel to run at
the roofline; a Pallas kernel's FLOPs are not in its call (only its bytes count), nor is its
integer work; an operand that a fusion reads only through slices counts as those slices,
any other that a kernel reads in part (a Pallas call's blocks) counts whole, and a loop's body
as often as `bound` is told it runs. What it shows well is
traffic that a change adds or removes: a slice, a transpose, a copy. `bert-jax plan` prints it
for GPU targets and `tools/gpu_roofline.py` per kind of kernel.
"""

from __future__ import annotations

import collections
import math
import re

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


def _parameter_reads(lines: list[str]) -> dict[int, int]:
  """Bytes a fused computation reads of each parameter that it reads only through slices
  (a slice of a gradient buffer, say): those slices' sizes (at most the operand's: slices may
  overlap)."""
  parsed = [m for m in map(_INSTRUCTION.match, lines) if m]
  reads = {}
  for param in (m for m in parsed if m.group(3) == "parameter"):
    users = [m for m in parsed if re.search(rf"%{re.escape(param.group(1))}\b", m.group(4))]
    if users and all(u.group(3) in ("slice", "dynamic-slice") and
                     u.group(4).startswith(f"%{param.group(1)}") for u in users):
      reads[int(param.group(4))] = sum(_nbytes(u.group(2)) for u in users)
  return reads


def kernels(hlo: str) -> list[dict]:
  """Each kernel of the compiled program's entry computation (and of its loops' bodies, once):
  its name, kind, result, bytes moved, matmul FLOPs and whether it is in a loop."""
  comps, entry = _computations(hlo)
  out = []

  def walk(name: str, loop: bool):
    lines = comps[name]
    types = {m.group(1): m.group(2) for m in map(_INSTRUCTION.match, lines) if m}
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m or m.group(3) in _NOT_KERNELS:
        continue
      result, op, rest = m.group(2), m.group(3), m.group(5)
      if op == "while":
        walk(re.search(r"body=%([\w.\-]+)", rest).group(1), True)
        continue
      operands = re.findall(r"%([\w.\-]+)", m.group(4))
      called = re.search(r"calls=%([\w.\-]+)", rest)
      reads = _parameter_reads(comps[called.group(1)]) if called else {}
      # a buffer written in place (output_to_operand_aliasing) is counted once, as the result;
      # an operand passed twice is read once
      aliased = set(re.findall(r"\{[\d,]*\}: \((\d+)", rest))
      read = {o: min(reads.get(i, math.inf), _nbytes(types.get(o, "")))
              for i, o in enumerate(operands) if str(i) not in aliased}
      moved = _nbytes(result) + sum(read.values())
      kind = re.sub(r"(\.\d+)+$", "", m.group(1)) if op == "fusion" else op
      if "xla.gpu.triton" in rest and op == "custom-call":
        kind = "pallas_call"
      out.append(dict(name=m.group(1), kind=kind, result=re.sub(r"\{[^}]*\}", "", result),
                      bytes=moved, flops=_dot_flops(comps, called.group(1)) if called else 0.0,
                      loop=loop))

  walk(entry, False)
  return out


def bound(rows: list[dict], bandwidth: float, peak: float, trips: int = 1) -> dict:
  """The step's roofline: per kernel max(bytes / bandwidth, FLOPs / peak), summed, a loop's
  kernels `trips` times (gradient accumulation's micro-batches); and the same per group of
  kernels (kind and result), most costly first."""
  groups = collections.defaultdict(lambda: dict(kernels=0, ms=0.0, gb=0.0))
  tflop = 0.0
  for row in rows:
    times = trips if row.get("loop") else 1
    group = groups[f"{row['kind']} {row['result'][:60]}"]
    group["kernels"] += times
    group["ms"] += 1e3 * max(row["bytes"] / bandwidth, row["flops"] / peak) * times
    group["gb"] += row["bytes"] * times / 1e9
    tflop += row["flops"] * times / 1e12
  ranked = sorted(groups.items(), key=lambda kv: -kv[1]["ms"])
  total = lambda key: sum(g[key] for g in groups.values())
  return dict(kernels=total("kernels"), ms=total("ms"), gb=total("gb"), tflop=tflop,
              groups=[dict(group=k, **v) for k, v in ranked])
