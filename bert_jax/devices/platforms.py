"""Which accelerator this host has, found without importing jax (so it can steer jax's start-up).

- `default_platform()`: the platform jax will train on here ("cpu", "tpu" or "gpu"): the first
  entry of JAX_PLATFORMS when set, else an accelerator whose chips are on this host's PCI bus
  *and* whose jax plugin is installed, else the CPU.
- `compute_dtype("auto", device)`: bfloat16 where the device has bfloat16 matrix units.
- `skip_absent_accelerators()`: with libtpu or a CUDA plugin installed (the `tpu` and `plan-gpu`
  extras, for `bert-jax plan`) but no such chip on this host, jax would still try them for its
  default backend, print errors and fall back to the CPU; this makes it start on the CPU
  directly.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

_PCI_DEVICES = pathlib.Path("/sys/bus/pci/devices")
_VENDORS = {"0x1ae0": "tpu", "0x10de": "gpu", "0x1002": "gpu"}  # Google, NVIDIA, AMD
_DISPLAY_OR_ACCELERATOR = ("0x03", "0x12")  # PCI classes: display controller, accelerator
_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                "jax_rocm7_plugin")


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def _backend_installed(kind: str) -> bool:
  """Whether jax's backend for "tpu" (libtpu) or "gpu" (a CUDA or ROCm plugin) is installed."""
  return _installed("libtpu") if kind == "tpu" else any(_installed(p) for p in _GPU_PLUGINS)


def _usable(present: set[str]) -> str | None:
  """The accelerator of `present` that jax has a backend for (a TPU first), else None."""
  return next((k for k in ("tpu", "gpu") if k in present and _backend_installed(k)), None)


def accelerators_on_host() -> set[str]:
  """{"tpu", "gpu"} by what the PCI bus lists (Linux); empty elsewhere or on a CPU-only host."""
  found = set()
  try:
    devices = list(_PCI_DEVICES.iterdir())
  except OSError:
    return found
  for device in devices:
    try:
      vendor = (device / "vendor").read_text().strip()
      klass = (device / "class").read_text().strip()
    except OSError:
      continue
    kind = _VENDORS.get(vendor)
    if kind == "tpu" or (kind == "gpu" and klass.startswith(_DISPLAY_OR_ACCELERATOR)):
      found.add(kind)
  return found


def default_platform() -> str:
  requested = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
  if requested:
    return {"cuda": "gpu", "rocm": "gpu"}.get(requested, requested)
  return _usable(accelerators_on_host()) or "cpu"


# What installs a host's accelerator backend for jax.
INSTALLS = {"gpu": "pip install 'bert-jax[cuda]'", "tpu": "pip install 'bert-jax[tpu]'"}
_PINNED = "BERT_JAX_PINNED_CPU"


def check_install(command: str) -> None:
  """UserError when this host has GPUs or TPUs but jax would start on its CPU (the CPU jaxlib,
  a plain `pip install`): training there would take days unnoticed. An explicit
  JAX_PLATFORMS=cpu runs on the CPU."""
  from bert_jax.errors import UserError
  if os.environ.get("JAX_PLATFORMS") and not os.environ.get(_PINNED):
    return
  present = accelerators_on_host()
  if not present:
    return
  kind = "tpu" if "tpu" in present else "gpu"
  if _backend_installed(kind):
    return
  raise UserError(f"{command}: this host has {kind.upper()}s but jax has no {kind.upper()} "
                  f"backend installed and would run on the CPU; install it with "
                  f"{INSTALLS[kind]} (or set JAX_PLATFORMS=cpu to run on the CPU anyway)")


def skip_absent_accelerators() -> None:
  """Start jax on the CPU when a backend for accelerators is installed (libtpu, or a CUDA
  plugin: both also compile for absent chips in `bert-jax plan`) but none that this host's PCI
  bus lists: jax would try each, print errors and fall back to the CPU anyway (and a CUDA plugin
  on a host without CUDA registers nothing then, not even its compiler). Leaves an explicit
  JAX_PLATFORMS alone, and a GPU plugin where the PCI bus cannot be read (jax looks itself)."""
  gpu_plugin = _backend_installed("gpu")
  if os.environ.get("JAX_PLATFORMS") or not (gpu_plugin or _backend_installed("tpu")):
    return
  if _usable(accelerators_on_host()):
    return
  if gpu_plugin and not _PCI_DEVICES.is_dir():
    return
  os.environ["JAX_PLATFORMS"] = "cpu"  # read when jax is imported; inherited by subprocesses
  os.environ[_PINNED] = "1"  # ours, not the user's: check_install still looks at the host
  if "jax" in sys.modules:  # imported already: its config has read the environment
    sys.modules["jax"].config.update("jax_platforms", "cpu")


# ----------------------------------------------------------------------------- precision

_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
  """The first processor's feature flags (Linux); empty where unreadable."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.partition(":")[2].split())
  except OSError:
    pass
  return set()


def has_bfloat16_units(device) -> bool:
  """Whether `device` multiplies bfloat16 matrices in hardware: every TPU, NVIDIA GPUs from
  Ampere on (compute capability 8.0), AMD's Instinct GPUs, CPUs with AMX or AVX-512 BF16."""
  if device.platform == "tpu":
    return True
  if device.platform == "gpu":
    capability = getattr(device, "compute_capability", None)
    if capability is None:  # ROCm devices report none; their bfloat16 units are MI200 on
      return True
    return float(capability) >= 8.0
  return bool(cpu_flags() & set(_CPU_BF16_FLAGS))


def compute_dtype(name: str, device) -> str:
  """`name` itself, or for "auto" bfloat16 where `device` has bfloat16 matrix units and
  float32 elsewhere."""
  if name != "auto":
    return name
  return "bfloat16" if has_bfloat16_units(device) else "float32"


def describe_dtype(name: str, device) -> str:
  """One line for a run's log: the compute dtype and, for auto, why."""
  chosen = compute_dtype(name, device)
  if name != "auto":
    return f"compute dtype {chosen}"
  kind = getattr(device, "device_kind", device.platform)
  has = "has" if chosen == "bfloat16" else "has no"
  return f"compute dtype {chosen} (auto: {kind} {has} bfloat16 matrix units)"
