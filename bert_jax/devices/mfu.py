"""Model FLOPs and model-FLOPs utilisation (MFU) for BERT pretraining, and what a device
holds: its peak FLOP/s and memory, a compiled step's peak, XLA's out-of-memory errors.

Training FLOPs of one sequence = 3 x forward (backward is twice the forward), forward = 2 FLOPs
per multiply-add of every matmul the sequence touches:
- encoder: per token and layer, Q/K/V/output projections (4 E^2) and the FFN (2 E F);
- bidirectional attention: per layer, scores Q K^T and the weighted sum of V, T^2 E each
  (full T x T, no causal halving);
- MLM head only at the P predicted positions: transform (E^2) and tied decoder (E V);
- pooler (E^2) and NSP classifier (2 E) once per sequence.
Embedding lookups, LayerNorms, softmax and biases are not matmuls and are left out, as in the
usual 6N accounting.
"""

from __future__ import annotations

import functools
import os
import re
import time

import jax
import jax.numpy as jnp

from bert_jax.config import BertConfig
from bert_jax.errors import UserError


def forward_macs_per_sequence(config: BertConfig, seq_len: int, max_predictions: int) -> int:
  e, f, v, layers = (config.hidden_size, config.intermediate_size, config.vocab_size,
                     config.num_hidden_layers)
  t, p = seq_len, max_predictions
  encoder = t * layers * (4 * e * e + 2 * e * f)
  attention = layers * 2 * t * t * e
  mlm = p * (e * e + e * v)
  pooler_nsp = e * e + 2 * e
  return encoder + attention + mlm + pooler_nsp


def train_flops_per_sequence(config: BertConfig, seq_len: int, max_predictions: int) -> int:
  """6 x (matmul params touched per token; MLM head only at the predicted positions) plus the
  bidirectional attention term, for one training sequence."""
  return 6 * forward_macs_per_sequence(config, seq_len, max_predictions)


# Dense bf16 peak FLOP/s per device (chip for TPU, GPU for NVIDIA), from vendor spec sheets.
# Matched as substrings of device.device_kind, most specific first.
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12), ("H100", 989e12),
    ("A100", 312e12),
)


GiB = 2**30
# Memory per device (HBM; for TPUs per chip), matched like PEAK_FLOPS. A local GPU or TPU reports
# what XLA may allocate (memory_stats); this table is for devices of a TPU topology description.
MEMORY_BYTES = (
    ("TPU v6 lite", 32 * GiB), ("TPU v6e", 32 * GiB),
    ("TPU v5 lite", 16 * GiB), ("TPU v5e", 16 * GiB),
    ("TPU v5p", 95 * GiB), ("TPU v5", 95 * GiB),
    ("TPU v4", 32 * GiB),
    ("H200", 141e9), ("H100", 80 * GiB), ("A100", 80 * GiB),
)


# The share of a GPU's memory that jax's allocator takes unless XLA_CLIENT_MEM_FRACTION (or
# the older XLA_PYTHON_CLIENT_MEM_FRACTION) says otherwise: a live GPU's bytes_limit.
GPU_MEMORY_FRACTION = 0.75


def gpu_memory_fraction() -> float:
  """The share of each GPU's memory that jax will allocate in this environment."""
  for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
    value = os.environ.get(name)
    if value:
      try:
        fraction = float(value)
      except ValueError:
        fraction = -1.0
      if not 0.0 < fraction <= 1.0:
        raise UserError(f"{name}={value}: expected a fraction of GPU memory in (0, 1]")
      return fraction
  return GPU_MEMORY_FRACTION


def memory_per_device(device) -> float | None:
  """Bytes one device can hold: what XLA reports it may allocate, else the table above (for a
  GPU compiled for without one, the share jax's allocator would take of it); for a CPU device,
  the host's physical memory."""
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # topology descriptions and some backends have no live statistics
    pass
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"])
  if device.platform == "cpu":
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  kind = device.device_kind.lower()
  table = next((float(b) for name, b in MEMORY_BYTES if name.lower() in kind), None)
  return table * gpu_memory_fraction() if table and device.platform == "gpu" else table


# What a step may take of a device's memory when planned or chosen (remat auto): the rest is for
# the allocator's fragmentation and the input batches in flight.
HEADROOM = 0.9


def compiled_peak_bytes(compiled) -> int:
  """Bytes a compiled program holds on one device at its peak (XLA's memory_analysis):
  arguments and outputs, a donated buffer once, temporaries and code."""
  stats = compiled.memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
          + stats.temp_size_in_bytes + stats.generated_code_size_in_bytes)


# How XLA says a program does not fit (TPU compilers refuse it; allocators at run time).
_OUT_OF_MEMORY = re.compile(r"(RESOURCE_EXHAUSTED|[Oo]ut of memory|Exceeded hbm)")


def out_of_memory(error: BaseException | str) -> bool:
  return bool(_OUT_OF_MEMORY.search(str(error)))


def _measured_matmul_flops(n: int = 512, repeats: int = 5) -> float:
  """Best observed float32 matmul rate on the default CPU device."""
  device = jax.devices("cpu")[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / max(best, 1e-9)


@functools.lru_cache(maxsize=None)
def _peak_for_kind(platform: str, kind: str) -> float | None:
  for name, flops in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return flops
  if platform == "cpu":
    return _measured_matmul_flops()
  return None


def peak_flops_per_device(device=None) -> float | None:
  """Peak FLOP/s of one device: the table above for TPUs and NVIDIA GPUs, a measured (cached)
  float32 matmul rate on CPU, None for a device we do not know (MFU is then not reported)."""
  device = device or jax.devices()[0]
  return _peak_for_kind(device.platform, device.device_kind)


def mfu(flops_per_sequence: float, sequences_per_second: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
  """Fraction of the mesh's peak that the model FLOPs use (None without a known peak)."""
  if not peak_per_device:
    return None
  return flops_per_sequence * sequences_per_second / (num_devices * peak_per_device)
