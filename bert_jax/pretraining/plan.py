"""`bert-jax plan`: compile the real train step for a TPU topology, NVIDIA GPUs (or this
machine's devices) ahead of time, and report per phase what a pod would give before it is rented.

  bert-jax plan --config configs/X.py[:arg] --topology v5e:4x4|v4:2x2x1|...|h100:8|local
                [--phase N|all] [--mfu 0.4] [--json] [--config.a.b=v ...]

Nothing is trained and no data is read: the train state and the batch are ShapeDtypeStructs with
their shardings, lowered through `steps.Pretraining` (what `bert-jax pretrain` runs) and
compiled by XLA for the topology's devices; libtpu compiles TPU programs on any host (MaxText's
train_compile.py works the same way), and jax's CUDA plugin GPU programs from a description of
the GPU (devices/gpu_targets.py). Memory and FLOPs are XLA's own figures (`memory_analysis()`,
`cost_analysis()`; it counts no FLOPs for a GPU compiled for without one). XLA counts a loop
body once, so with gradient accumulation the FLOPs are corrected: the update outside the loop
is compiled alone and the rest multiplied by the number of micro-batches.

Exit codes: 0 every planned phase fits; 3 one does not (with what would make it fit); 2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.config import BertConfig
from bert_jax.data.batch import abstract_batch
from bert_jax.devices import gpu_targets, hostmem, mfu, platforms, roofline
from bert_jax.errors import UserError, cli_entry
from bert_jax.modeling import attention
from bert_jax.pretraining.run_config import (objective_of, parse_overrides, remat_of,
                                             resolve_config)
from bert_jax.storage.fileio import as_path
from bert_jax.training import steps
from bert_jax.training.phases import Phase, make_phases
from bert_jax.training.sharding import batch_sharding, check_batches_split, make_mesh

EXIT_DOES_NOT_FIT = 3
MEGACORE = ("v4", "v5p")  # two TensorCores per chip, addressed as one device


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  devices: list
  kind: str                    # device_kind, e.g. "TPU v5 lite"
  memory_per_chip: float | None
  peak_flops: float | None     # per chip (dense bf16 for accelerators)
  bandwidth: float | None = None  # HBM bytes/s per chip, for NVIDIA GPUs (devices/roofline.py)
  # of a GPU compiled for without one: the share of its memory a run's allocator takes
  memory_fraction: float | None = None


# ----------------------------------------------------------------------------- topology

@contextlib.contextmanager
def _quiet_fd2():
  """libtpu writes its start-up complaints about a host that is no TPU VM straight to file
  descriptor 2; they say nothing about an ahead-of-time compile."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def load_target(name: str) -> Target:
  """`local` (this machine's devices), an NVIDIA GPU topology (`h100:8`, `h200:2x8`; see
  devices/gpu_targets.py) or a TPU topology as get_topology_desc names it."""
  fraction = None
  if name == "local":
    devices = jax.devices()
  elif gpu_targets.parse(name):
    # read before jax's CUDA plugin starts: a bad XLA_CLIENT_MEM_FRACTION breaks the plugin
    fraction = mfu.gpu_memory_fraction()
    try:
      devices = gpu_targets.devices(name)
    except RuntimeError as e:
      raise UserError(f"--topology {name}: {str(e).splitlines()[0][:200]}") from None
  else:
    version, _, shape = name.partition(":")
    if not re.fullmatch(r"v\d+[a-z]*", version) or not re.fullmatch(r"\d+(x\d+)+", shape):
      raise UserError(f"--topology {name}: expected a TPU topology such as v5e:2x2, v4:2x2x1, "
                      f"v5p:2x2x4, v6e:2x4, a GPU one ({', '.join(gpu_targets.GPUS)}: h100:8, "
                      "h100:2x8), or local")
    try:
      from jax.experimental import topologies
      import libtpu  # noqa: F401  (the compiler for TPU programs)
    except ImportError:
      raise UserError(f"--topology {name}: compiling for a TPU needs libtpu: pip install "
                      "'bert-jax[tpu]'") from None
    # A second libtpu in one machine (another plan, a test) is fine: nothing runs on a chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
      with _quiet_fd2():
        devices = list(topologies.get_topology_desc(
            name, "tpu", chip_config_name="megacore" if version in MEGACORE else "default").devices)
    except Exception as e:  # libtpu's own message says what is wrong with the name
      raise UserError(f"--topology {name}: {str(e).splitlines()[0][:200]}") from None
  device = devices[0]
  return Target(name, devices, device.device_kind, mfu.memory_per_device(device),
                mfu.peak_flops_per_device(device), gpu_targets.bandwidth_of(device.device_kind),
                fraction)


# ----------------------------------------------------------------------------- the model

def model_config_of(cfg: Any, device: Any = None) -> BertConfig:
  """The model `bert-jax pretrain` would build on `device` (dtype auto), without reading
  weights or data: the vocab's size from data.vocab when it is a file here, else init_from's,
  else data.vocab_size."""
  from bert_jax.config import find_config
  from bert_jax.pretraining.workdir import model_config_for, count_lines
  vocab = str(cfg.data.vocab)
  init_config = None
  if cfg.init_from:
    init_config = find_config(str(cfg.init_from))
    if init_config is None:
      raise UserError(f"--config.init_from={cfg.init_from}: no config.json there")
  if vocab and as_path(vocab).is_file():
    entries = count_lines(vocab)
  else:
    entries = init_config.vocab_size if init_config else int(cfg.data.vocab_size)
    vocab = "config.data.vocab_size"
  return model_config_for(cfg, entries, init_config, vocab, device)


# ----------------------------------------------------------------------------- one phase

def _bytes_per_chip(tree: Any) -> int:
  """Bytes of one device's shard of every leaf (ShapeDtypeStructs with shardings)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled program; None where the compiler gives none (a GPU
  compiled for without one)."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis.get("flops", 0.0)) if analysis else None


def _update_flops(pretraining: steps.Pretraining) -> float:
  """FLOPs of the per-step update alone (compiled on its own; cheap: elementwise only)."""
  abstract = pretraining.abstract_state
  metrics = {"loss": jax.ShapeDtypeStruct((), jnp.float32)}
  return _flops(pretraining.update_step.lower(abstract, abstract.params, metrics).compile())


_TEMPORARIES = re.compile(r"temporaries \(([\d.]+)G\)")


def plan_phase(model_config: BertConfig, cfg: Any, phase: Phase, mesh,
               pretraining: steps.Pretraining, target: Target, assumed_mfu: float) -> dict:
  """Compiles one phase's train step; returns its memory, FLOPs and time figures."""
  abstract = pretraining.abstract_state
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  chips = mesh.devices.size
  batch = abstract_batch(batch_sharding(mesh), phase.batch_size, phase.seq_len,
                         phase.max_predictions)
  memory = dict(params=_bytes_per_chip(abstract.params),
                opt_state=_bytes_per_chip(abstract.opt_state), batch=_bytes_per_chip(batch),
                capacity=target.memory_per_chip)
  out = dict(phase=phase.index + 1, seq_len=phase.seq_len, batch_size=phase.batch_size,
             grad_accum=phase.grad_accum, steps=phase.num_steps, mesh=dict(mesh.shape),
             per_chip_micro_batch=phase.micro_batch_size // shards, memory=memory)
  print(f"compiling phase {phase.index + 1} (seq {phase.seq_len}, batch {phase.batch_size}"
        f"{f' = {phase.grad_accum} x {phase.micro_batch_size}' if phase.grad_accum > 1 else ''})"
        f" for {target.name}: {chips} x {target.kind}, mesh {dict(mesh.shape)} ...",
        file=sys.stderr, flush=True)
  start = time.perf_counter()
  try:
    compiled = pretraining.lower_train_step(phase).compile()
  except Exception as e:
    message = str(e)
    if "cuDNN" in message and gpu_targets.parse(target.name):
      raise UserError(f"--topology {target.name}: attention through cuDNN cannot be planned "
                      f"without the cuDNN library ({message.splitlines()[0][:100]}); plan "
                      "--config.model.attention=pallas or =xla") from None
    if "ptxas" in message and gpu_targets.parse(target.name):
      raise UserError(f"--topology {target.name}: XLA found no ptxas (NVIDIA's assembler) to "
                      "compile for the GPU; pip install 'bert-jax[plan-gpu]' brings it") from None
    if not mfu.out_of_memory(message):
      raise
    out.update(_remat(pretraining, phase), compile_s=round(time.perf_counter() - start, 1),
               fits=False, compiler_error=message.strip().splitlines()[0][:300])
    needed = _TEMPORARIES.search(message)  # XLA TPU: "... HLO temporaries (42.39G) exceeds"
    memory.update(peak=None, margin=None,
                  temporaries=float(needed.group(1)) * 2**30 if needed else None)
    out["suggestions"] = suggestions(cfg, phase, mesh, memory)
    return out
  out.update(_remat(pretraining, phase), compile_s=round(time.perf_counter() - start, 1))
  stats = compiled.memory_analysis()
  peak = mfu.compiled_peak_bytes(compiled)
  memory.update(arguments=stats.argument_size_in_bytes, temporaries=stats.temp_size_in_bytes,
                code=stats.generated_code_size_in_bytes, peak=peak)
  fits = target.memory_per_chip is None or peak <= target.memory_per_chip
  memory["margin"] = None if target.memory_per_chip is None else target.memory_per_chip - peak
  out["fits"] = fits
  compiled_flops = _flops(compiled)
  if phase.grad_accum > 1 and compiled_flops is not None:  # the loop body was counted once
    outside = _update_flops(pretraining)
    compiled_flops = outside + phase.grad_accum * (compiled_flops - outside)
  model_flops = (mfu.train_flops_per_sequence(model_config, phase.seq_len, phase.max_predictions)
                 * phase.batch_size / chips)
  out["flops"] = dict(compiled_per_chip=compiled_flops, model_per_chip=model_flops,
                      ratio=None if compiled_flops is None else compiled_flops / model_flops)
  if target.peak_flops:
    bound_s = (model_flops if compiled_flops is None else compiled_flops) / target.peak_flops
    at_mfu_s = model_flops / (assumed_mfu * target.peak_flops)
    rate = lambda s: dict(step_s=s, sequences_per_s=phase.batch_size / s,
                          tokens_per_s=phase.batch_size * phase.seq_len / s)
    out["bound"] = rate(bound_s)
    if target.bandwidth:  # XLA counts no GPU FLOPs, and a GPU step is far from matmuls alone
      roofline_s = roofline.bound(roofline.kernels(compiled.as_text()), target.bandwidth,
                                  target.peak_flops, trips=phase.grad_accum)["ms"] / 1e3
      out["roofline"] = dict(rate(roofline_s),
                             mfu=model_flops / (target.peak_flops * roofline_s))
    out["at_mfu"] = dict(rate(at_mfu_s), mfu=assumed_mfu, phase_s=phase.num_steps * at_mfu_s)
  if not fits:
    out["suggestions"] = suggestions(cfg, phase, mesh, memory)
  return out


def _remat(pretraining: steps.Pretraining, phase: Phase) -> dict:
  """remat: how much the step recomputes; remat_auto: why, where model.remat is auto."""
  choice = pretraining.remat_choices.get(phase.index)
  return dict(remat=pretraining.remat(phase), remat_auto=choice and choice.describe())


def suggestions(cfg: Any, phase: Phase, mesh, memory: dict) -> list[str]:
  """What would make a phase fit, most effective first."""
  out = []
  capacity, peak = memory["capacity"], memory.get("peak")
  state = memory["params"] + memory["opt_state"]
  if remat_of(cfg) in (False, "dots"):
    out.append("--config.model.remat=auto (recompute activations in the backward pass, as much "
               "as each phase needs to fit)")
  if capacity and state > 0.25 * capacity:
    fsdp = mesh.shape["fsdp"] * 2
    out.append(f"--config.mesh.fsdp={fsdp} (shard parameters and optimizer state {fsdp} ways; "
               f"they take {state / 2**30:.2f} GiB per chip now)")
  per_shard = phase.micro_batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
  factor = 2
  temporaries = memory.get("temporaries")
  if capacity and temporaries:  # activations scale with the micro-batch, the state does not
    rest = (peak - temporaries) if peak else state + memory["batch"]
    while factor < per_shard and rest + temporaries / factor > mfu.HEADROOM * capacity:
      factor *= 2
  if per_shard >= factor:
    out.append(f"--config.phases.{phase.index}.grad_accum={phase.grad_accum * factor} (a "
               f"{per_shard // factor}-row micro-batch per chip instead of {per_shard}; the "
               "update is the same)")
  return out


# ----------------------------------------------------------------------------- report

def _size(x: float | None) -> str:
  if x is None:
    return "?"
  return f"{x / 2**30:.2f} GiB" if abs(x) >= 2**30 else f"{x / 2**20:.1f} MiB"


def _ms(seconds: float) -> str:
  ms = seconds * 1e3
  return f"{ms:.1f} ms" if ms >= 10 else f"{ms:.3g} ms"


def _duration(seconds: float) -> str:
  if seconds >= 86400:
    return f"{seconds / 86400:.1f} days"
  if seconds >= 3600:
    return f"{seconds / 3600:.1f} h"
  return f"{seconds:.0f} s"


def format_report(report: dict) -> str:
  t = report["target"]
  peak = "?" if not t["peak_flops"] else f"{t['peak_flops'] / 1e12:.0f}"
  share = ("" if not t.get("memory_fraction") else f" ({t['memory_fraction']:.0%} of its memory, "
           "what jax's allocator takes: XLA_CLIENT_MEM_FRACTION)")
  lines = [f"{report['config']} on {t['name']}: {t['chips']} x {t['kind']}, "
           f"{_size(t['memory_per_chip'])}{share} and {peak} TFLOP/s per chip; model "
           f"{report['model']}; {report['attention']}"]
  for p in report["phases"]:
    m = p["memory"]
    lines.append(f"phase {p['phase']}: seq {p['seq_len']}, batch {p['batch_size']} "
                 f"(x{p['grad_accum']} accumulation, {p['per_chip_micro_batch']} rows per chip "
                 f"per micro-batch), {p['steps']} steps, mesh {p['mesh']}, compiled in "
                 f"{p['compile_s']:.1f} s")
    verdict = "FITS" if p["fits"] else "DOES NOT FIT"
    margin = "" if m["margin"] is None else f", margin {_size(m['margin'])}"
    lines.append(f"  memory per chip: params {_size(m['params'])}, optimizer state "
                 f"{_size(m['opt_state'])}, batch {_size(m['batch'])}, temporaries "
                 f"{_size(m.get('temporaries'))}, code {_size(m.get('code'))}; peak "
                 f"{_size(m['peak'])} of {_size(m['capacity'])}: {verdict}{margin}")
    if p.get("remat_auto"):
      lines.append(f"  {p['remat_auto']} (model.remat auto)")
    if "compiler_error" in p:
      lines.append(f"  compiler: {p['compiler_error']}")
    if "flops" in p:
      f = p["flops"]
      compiled = ("? (the compiler counts none)" if f["compiled_per_chip"] is None
                  else f"{f['compiled_per_chip']:.3e}")
      ratio = "" if f["ratio"] is None else f" (ratio {f['ratio']:.2f})"
      lines.append(f"  FLOPs per chip per step: compiled {compiled}, model "
                   f"{f['model_per_chip']:.3e}{ratio}")
    for key, label in (("bound", "at peak (bound)"),
                       ("roofline", "at the roofline (each kernel at HBM bandwidth or peak; "
                                    "MFU {mfu:.1%} at most)"),
                       ("at_mfu", "at {mfu:.0%} MFU")):
      if key in p:
        r = p[key]
        lines.append(f"  {label.format(**r)}: {_ms(r['step_s'])} per step, "
                     f"{r['sequences_per_s']:,.0f} sequences/s, {r['tokens_per_s']:,.0f} "
                     f"tokens/s" + (f"; phase {_duration(r['phase_s'])}" if "phase_s" in r
                                    else ""))
    for s in p.get("suggestions", []):
      lines.append(f"  to fit, try: {s}")
  if report.get("schedule_s") is not None:
    lines.append(f"whole schedule at {report['mfu']:.0%} MFU: "
                 f"{_duration(report['schedule_s'])}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

class Setup(NamedTuple):
  """What `plan` compiles a config's steps from, for some devices."""
  model_config: BertConfig
  phases: list[Phase]
  mesh: Any
  pretraining: steps.Pretraining


def setup(cfg: Any, devices: list) -> Setup:
  """The model, phases, mesh and steps of `cfg` over `devices` (compile-only ones included);
  nothing is compiled yet."""
  model_config = model_config_of(cfg, devices[0])
  phases = make_phases(cfg)
  mesh = make_mesh(int(cfg.mesh.data), int(cfg.mesh.fsdp), int(cfg.mesh.tensor),
                   devices=devices)
  return Setup(model_config, phases, mesh,
               steps.Pretraining(model_config, cfg, mesh, phases, objective_of(cfg),
                                 auto_remat=remat_of(cfg) == "auto"))


_REMAT_NOTE = {True: ", remat", "dots": ", remat dots", False: "", "auto": ", remat auto"}


def plan(cfg: Any, target: Target, phase_numbers: list[int] | None, assumed_mfu: float,
         config_name: str = "") -> dict:
  model_config, phases, mesh, pretraining = setup(cfg, target.devices)
  chosen = phases if phase_numbers is None else [phases[n - 1] for n in phase_numbers]
  check_batches_split(chosen, mesh)  # before minutes of compiling
  results = [plan_phase(model_config, cfg, p, mesh, pretraining, target, assumed_mfu)
             for p in chosen]
  timed = [r["at_mfu"]["phase_s"] for r in results if "at_mfu" in r]
  return dict(
      config=config_name, model=f"{model_config.num_hidden_layers} x "
      f"{model_config.hidden_size}, vocab {model_config.vocab_size}"
      f"{_REMAT_NOTE[remat_of(cfg)]}, {model_config.dtype}",
      attention=attention.describe(model_config.attention, target.devices[0].platform,
                                   model_config.attention_probs_dropout_prob,
                                   model_config.dtype),
      target=dict(name=target.name, chips=len(target.devices), kind=target.kind,
                  memory_per_chip=target.memory_per_chip, peak_flops=target.peak_flops,
                  memory_fraction=target.memory_fraction),
      mfu=assumed_mfu, phases=results, fits=all(r["fits"] for r in results),
      schedule_s=sum(timed) if phase_numbers is None and len(timed) == len(results) else None)


def _phase_numbers(text: str, count: int) -> list[int] | None:
  if text == "all":
    return None
  if not text.isdigit() or not 1 <= int(text) <= count:
    raise UserError(f"--phase {text}: expected a phase number 1..{count} or all")
  return [int(text)]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="bert-jax plan",
      description="Compile the real train step ahead of time for a TPU topology, NVIDIA GPUs "
                  "(or this machine's devices) and report memory per chip, FLOPs, step time and "
                  "the schedule's wall time per phase. Exit 3 when a phase does not fit.",
      epilog="Override config fields as for pretrain: --config.phases.0.batch_size=512, "
             "--config.mesh.fsdp=4, --config.model.remat=False.")
  p.add_argument("--config", required=True, metavar="FILE[:ARG]")
  p.add_argument("--topology", required=True,
                 help="a TPU topology (v5e:2x2, v5e:16x16, v4:2x2x1, v5p:2x2x4, v6e:2x4), "
                      "NVIDIA GPUs (h100:8 = one host of 8, h200:2x8, a100:8) or local (this "
                      "machine's devices)")
  p.add_argument("--phase", default="all", help="phase number (1 = first) or all")
  p.add_argument("--mfu", type=float, default=0.4,
                 help="assumed model-FLOPs utilisation for the time estimates (default 0.4)")
  p.add_argument("--json", action="store_true", help="print the report as JSON")
  return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
  args, rest = build_parser().parse_known_args(argv)
  if not 0.0 < args.mfu <= 1.0:
    raise UserError(f"--mfu {args.mfu}: expected a fraction in (0, 1]")
  cfg = resolve_config(args.config, parse_overrides(rest))
  numbers = _phase_numbers(args.phase, len(make_phases(cfg)))
  if args.topology == "local":
    platforms.check_install("plan --topology local")
  target = load_target(args.topology)
  report = plan(cfg, target, numbers, args.mfu, config_name=args.config)
  print(json.dumps(report, indent=1) if args.json else format_report(report), flush=True)
  return 0 if report["fits"] else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
  hostmem.reexec_with_deep_stacks()
  sys.exit(main())
