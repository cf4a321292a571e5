"""NVIDIA GPUs that `bert-jax plan` compiles for without one attached.

XLA's GPU compiler takes a description of the target (a GpuTargetConfigProto: compute
capability, SMs, memories) in place of a device, through jax's CUDA plugin; jax's
`cuda13-local` extra installs that plugin without NVIDIA's libraries (`pip install
'bert-jax[plan-gpu]'`). The figures below are the vendors' spec-sheet numbers that XLA's
fusion, tiling and cost heuristics read. cuDNN attention cannot be planned this way (jax asks the
cuDNN library for its version while tracing); the XLA path and the Pallas kernel can.

Topology names: `h100:8` (one host, 8 GPUs) or `h100:2x8` (2 hosts of 8).
"""

from __future__ import annotations

import re
from typing import NamedTuple

GiB = 2**30
MiB = 2**20


class Gpu(NamedTuple):
  device_name: str  # as the CUDA driver names it (device_kind)
  capability: tuple[int, int]
  sms: int
  memory: int  # bytes
  bandwidth: float  # bytes/s
  l2: int  # bytes
  clock_ghz: float
  shared_per_sm: int  # bytes
  shared_per_block_optin: int  # bytes
  fp32_per_sm: int


GPUS = {
    "a100": Gpu("NVIDIA A100-SXM4-80GB", (8, 0), 108, 80 * GiB, 2.039e12, 40 * MiB, 1.41,
                164 * 1024, 163 * 1024, 64),
    "h100": Gpu("NVIDIA H100 80GB HBM3", (9, 0), 132, 80 * GiB, 3.35e12, 50 * MiB, 1.98,
                228 * 1024, 227 * 1024, 128),
    "h200": Gpu("NVIDIA H200 141GB HBM3e", (9, 0), 132, 141 * 10**9, 4.8e12, 50 * MiB, 1.98,
                228 * 1024, 227 * 1024, 128),
}
_NAME = re.compile(r"([a-z]\d+):(?:(\d+)x)?(\d+)")


def parse(name: str) -> tuple[str, int, int] | None:
  """(gpu, hosts, GPUs per host) of a name such as h100:8 or h100:2x8; None for other names."""
  match = _NAME.fullmatch(name)
  if not match or match.group(1) not in GPUS:
    return None
  return match.group(1), int(match.group(2) or 1), int(match.group(3))


def bandwidth_of(device_kind: str) -> float | None:
  """HBM bytes/s of a GPU by its device_kind (a live one, or one compiled for); None for
  devices not in GPUS."""
  return next((gpu.bandwidth for gpu in GPUS.values() if gpu.device_name == device_kind), None)


def target_config(gpu: Gpu) -> str:
  """The GpuTargetConfigProto (text format) XLA compiles for."""
  major, minor = gpu.capability
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {gpu.shared_per_sm}
  shared_memory_per_block_optin: {gpu.shared_per_block_optin}
  threads_per_core_limit: 2048
  core_count: {gpu.sms}
  fpus_per_core: {gpu.fp32_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(gpu.bandwidth)}
  l2_cache_size: {gpu.l2}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {gpu.memory}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
device_description_str: "{gpu.device_name}"
"""


def devices(name: str) -> list:
  """Compile-only devices of a GPU topology name (see `parse`). RuntimeError without jax's
  CUDA plugin."""
  gpu_name, hosts, per_host = parse(name)
  from jax.experimental import topologies
  try:
    topology = topologies.get_topology_desc(
        platform="cuda", target_config=target_config(GPUS[gpu_name]),
        topology=f"1x{hosts}x{per_host}")
  except NotImplementedError:  # no CUDA plugin registered a topology maker
    raise RuntimeError("compiling for an NVIDIA GPU needs jax's CUDA plugin: pip install "
                       "'bert-jax[plan-gpu]'") from None
  return list(topology.devices)
