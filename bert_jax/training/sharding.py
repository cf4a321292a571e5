"""Device mesh, the one table of logical-axis rules, and multi-host helpers.

The model names every parameter and activation axis logically (batch, length, embed, heads, kv,
mlp, vocab); `LOGICAL_AXIS_RULES` maps those names onto the mesh axes (data, fsdp, tensor):

- batch  -> (data, fsdp): both axes split the batch; fsdp additionally shards the weights.
- embed  -> fsdp: every weight matrix has an embed dimension, so FSDP shards all of them (and
  the optimizer state that mirrors them) and all-gathers a layer's weights just before use.
  Activations are [batch, length, embed]; batch claims fsdp first (flax gives each mesh axis to
  the first rule that asks for it), so activations stay batch-sharded and unsharded on embed.
- heads, mlp, vocab -> tensor: Megatron-style tensor parallelism. Attention is split by head,
  the FFN by its inner width, the tied embedding/decoder by vocabulary row.
- kv (head dim) and length -> None: head dims are small (64) and splitting them would put a
  reduction inside every attention score; sequence parallelism would need an all-to-all.
A mesh with only a data axis (fsdp = tensor = 1) is plain data parallelism (what pmap did).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bert_jax.devices import platforms
from bert_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

  data=-1 takes all devices left after fsdp and tensor.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  for name, size in (("fsdp", fsdp), ("tensor", tensor)):
    if size < 1:
      raise UserError(f"mesh.{name}={size}: expected a positive integer")
  if data == -1:
    if n % (fsdp * tensor):
      raise UserError(f"mesh.fsdp={fsdp} x mesh.tensor={tensor} does not divide the {n} "
                      "devices")
    data = n // (fsdp * tensor)
  if data < 1 or data * fsdp * tensor != n:
    raise UserError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} must equal the number "
                    f"of devices ({n}); set mesh.data=-1 to use all remaining devices")
  return Mesh(_place(devices, (data, fsdp, tensor)), MESH_AXES)


def parse_mesh_flag(text: str | None, flag: str = "--mesh") -> dict[str, int]:
  """`data=N,fsdp=M,tensor=K` (any subset; data=-1 takes the devices left) -> make_mesh's
  keyword arguments; "" or None: all devices on data."""
  sizes = {}
  for part in filter(None, (text or "").split(",")):
    name, _, value = part.partition("=")
    name = name.strip()
    if name not in MESH_AXES or name in sizes or not re.fullmatch(r"-?\d+", value.strip()):
      raise UserError(f"{flag} {text}: expected comma-separated data=N,fsdp=M,tensor=K")
    sizes[name] = int(value)
  return sizes


def _place(devices: list, shape: tuple[int, ...]) -> np.ndarray:
  """Devices arranged topology-aware (the last mesh axes, tensor then fsdp, on the closest
  chips), allowing a physical axis to be split over mesh axes where a shape needs it (e.g.
  data 4 x fsdp 2 x tensor 2 on a 4x4 v5e). Plain device order when no placement is found:
  silently on CPU (all devices are alike), with a warning elsewhere (slower collectives)."""
  from jax.experimental import mesh_utils
  error = None
  for split in (False, True):
    try:
      return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)
    except Exception as e:  # no assignment of this shape onto the physical axes
      error = e
  if devices[0].platform != "cpu":
    kind = getattr(devices[0], "device_kind", devices[0].platform)
    warnings.warn(f"mesh {dict(zip(MESH_AXES, shape))}: no topology-aware placement on "
                  f"{len(devices)} {kind} devices ({str(error).splitlines()[0][:160]}); using "
                  "device order, so collectives may take slower links", stacklevel=3)
  return np.asarray(devices, dtype=object).reshape(shape)


def check_batches_split(phases: Any, mesh: Mesh) -> None:
  """UserError unless every phase's micro-batch (batch_size / grad_accum rows) splits evenly
  over the mesh's batch axes (data x fsdp): jit cannot place a batch unevenly."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for p in phases:
    if p.micro_batch_size % shards:
      raise UserError(f"--config.phases.{p.index}.batch_size={p.batch_size} with grad_accum="
                      f"{p.grad_accum}: a micro-batch of {p.micro_batch_size} rows does not "
                      f"split over the mesh's data x fsdp = {shards} devices; choose a "
                      f"grad_accum that leaves a multiple of {shards} rows")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp; other dimensions replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops the mesh axes of any dimension they do not divide evenly (e.g. vocab 30522 over
  tensor=4): jit cannot place an argument unevenly, and replicating one dimension is cheap."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  fitted = []
  for dim, axes in zip(shape, entries):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if size > 1 and dim % size == 0 else None)
  return P(*fitted)


def logical_shardings(mesh: Mesh, boxed_abstract_tree: Any) -> Any:
  """NamedShardings (a tree shaped like the unboxed tree) from boxed logical annotations, e.g.
  a train state's params and the optimizer state that mirrors them (`jax.eval_shape` of an
  init); unannotated leaves (step, counts) are replicated."""
  logical_specs = nn.get_partition_spec(boxed_abstract_tree)
  mesh_shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)
  shapes = nn.unbox(boxed_abstract_tree)
  return jax.tree.map(
      lambda s, x: NamedSharding(mesh, _fit_spec(s.spec, tuple(x.shape), mesh)),
      mesh_shardings, shapes)


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's own rows into global arrays split over (data, fsdp).

  Every process passes the same number of rows, its slice of the global batch in process
  order; with one process this is a sharded device_put.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in host_batch.items()}


# Environment variables that mean "this process is one of several launched together".
_CLUSTER_HINTS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
# A launch by hand: JAX_COORDINATOR_ADDRESS=host:port plus these (jax reads only the address).
_BY_HAND = (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))


def _launched_on_several_hosts() -> bool:
  if any(os.environ.get(k) for k in _CLUSTER_HINTS):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  # Cloud TPU VMs list every host of the slice; one entry means a single host.
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def _distributed_is_initialized() -> bool:
  is_init = getattr(jax.distributed, "is_initialized", None)
  if is_init is not None:
    return bool(is_init())
  from jax._src import distributed  # older jax: no public query
  return distributed.global_state.client is not None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: list[int] | None = None) -> bool:
  """Calls jax.distributed.initialize() when this process is one of several (explicit
  arguments, or a TPU pod / SLURM / MPI / JAX_COORDINATOR_ADDRESS environment); a no-op on a
  single host and when already initialized. Returns whether JAX runs multi-process."""
  if _distributed_is_initialized():
    return True
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if not explicit and not _launched_on_several_hosts():
    return False
  kwargs = {k: v for k, v in dict(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, local_device_ids=local_device_ids).items() if v is not None}
  for key, env in _BY_HAND:
    if key not in kwargs and os.environ.get(env):
      kwargs[key] = int(os.environ[env])
  if platforms.default_platform() == "cpu":  # CPU processes need a collectives backend
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return True
