"""Mesh, logical-axis rules, and parity of sharded / multi-process training with one device."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bert_jax.errors import UserError
from bert_jax.training import sharding

WORKER = os.path.join(os.path.dirname(__file__), "_mesh_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_mesh_shapes_and_errors():
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh(devices=devices)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(UserError, match="must equal the number of devices"):
    sharding.make_mesh(2, 1, 1, devices=devices)
  with pytest.raises(UserError, match="does not divide"):
    sharding.make_mesh(-1, 2, 1, devices=devices)
  with pytest.raises(UserError, match="mesh.tensor"):
    sharding.make_mesh(1, 1, 0, devices=devices)


def test_rules_table_maps_logical_axes():
  import flax.linen as nn
  rules = sharding.LOGICAL_AXIS_RULES
  to_mesh = lambda names: nn.logical_to_mesh_axes(names, rules)
  assert to_mesh(("embed", "heads", "kv")) == P("fsdp", "tensor", None)   # q/k/v kernels
  assert to_mesh(("mlp", "embed")) == P("tensor", "fsdp")                  # FFN out kernel
  assert to_mesh(("vocab", "embed")) == P("tensor", "fsdp")                # word embeddings
  # Activations: batch takes (data, fsdp) first, so embed stays unsharded.
  assert to_mesh(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)


def test_fit_spec_drops_axes_that_do_not_divide():
  class FakeMesh:
    shape = {"data": 1, "fsdp": 2, "tensor": 4}
  spec = sharding._fit_spec(P("tensor", "fsdp"), (30522, 768), FakeMesh())
  assert spec == P(None, "fsdp")  # 30522 % 4 != 0: vocab replicated


def test_initialize_distributed_is_a_no_op_on_one_host(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS",
            "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert sharding.initialize_distributed() is False
  assert sharding.initialize_distributed() is False  # safe to call twice
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  assert sharding._launched_on_several_hosts() is False
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host0,host1")
  assert sharding._launched_on_several_hosts() is True


def _run(args, timeout=600):
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _results(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_meshes_agree_with_one_device_with_dropout():
  """(8,1,1), (2,4,1), (2,2,2) and a single device: same losses over 4 steps, dropout on."""
  results = _results(_run(["--devices", "8", "--meshes", "8,1,1;2,4,1;2,2,2;1,1,1",
                           "--steps", "4", "--dropout", "0.1"]))
  by_mesh = {r["mesh"]: np.array(r["losses"]) for r in results}
  assert set(by_mesh) == {"8,1,1", "2,4,1", "2,2,2", "1,1,1"}
  reference = by_mesh["1,1,1"]
  assert reference[-1] != reference[0]  # the params really changed between steps
  for mesh, losses in by_mesh.items():
    np.testing.assert_allclose(losses, reference, rtol=0, atol=1e-5, err_msg=mesh)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_distributed_matches_one_process():
  """Two jax.distributed processes with 2 CPU devices each, each feeding its half of every
  global batch, on a (2,2,1) mesh, against one process with 4 devices."""
  coordinator = f"localhost:{_free_port()}"
  procs = [_run(["--devices", "2", "--meshes", "2,2,1", "--steps", "3", "--dropout", "0.1",
                 "--coordinator", coordinator, "--num-processes", "2",
                 "--process-id", str(i)]) for i in range(2)]
  single = _run(["--devices", "4", "--meshes", "2,2,1", "--steps", "3", "--dropout", "0.1"])
  multi = [_results(p)[0] for p in procs]
  reference = np.array(_results(single)[0]["losses"])
  assert sorted(r["process"] for r in multi) == [0, 1]
  for r in multi:
    np.testing.assert_allclose(np.array(r["losses"]), reference, rtol=0, atol=1e-5)
