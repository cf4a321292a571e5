"""A GPU train step's lower bound, read from the program XLA compiles for it, with no GPU.

  python tools/gpu_roofline.py --config configs/bert_base_paper.py --topology h200:1 \\
      --phase 1 --attention xla pallas [--top 12] [--json-out roofline.json]

For each attention path the step is compiled as `bert-jax plan` compiles it (devices/
gpu_targets.py describes the GPU) and bounded as `bert_jax/devices/roofline.py` says: each kernel
at the larger of its bytes / HBM bandwidth and its matmul FLOPs / peak. Kernels are grouped by
what they make (a fusion's kind and its result's shape), most costly first, and each path's
total is printed with its ratio to the first path's. A bound to compare programs by, not a
forecast of their speed.
"""

from __future__ import annotations

import argparse
import json
import sys

from bert_jax.devices.roofline import bound, kernels


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
