"""`bert-jax plan`: the real train step compiled for TPU topologies and NVIDIA GPUs on this CPU
host.

Kept small: a 2-layer, 128-wide BERT at short lengths compiles for a TPU in seconds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

pytest.importorskip("libtpu", reason="the tpu extra (libtpu) compiles TPU programs")

from bert_jax.errors import UserError  # noqa: E402
from bert_jax.pretraining import plan  # noqa: E402
from bert_jax.pretraining.run_config import resolve_config  # noqa: E402
from bert_jax.training import sharding, steps  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny_cpu.py")
# One short phase: a tiny BERT at length 64, 16 sequences, 10 predictions.
SHORT = [("phases", "[{'fraction': 1.0, 'seq_len': 64, 'max_predictions': 10, "
                    "'batch_size': 16, 'grad_accum': 1}]"), ("total_steps", "100")]


def _cfg(*overrides):
  return resolve_config(TINY, SHORT + list(overrides))


@pytest.fixture(scope="module")
def v5e():
  return plan.load_target("v5e:2x2")


def _lowered_text(cfg, devices):
  model_config = plan.model_config_of(cfg)
  mesh = sharding.make_mesh(devices=devices)
  phases = plan.make_phases(cfg)
  return steps.Pretraining(model_config, cfg, mesh, phases).lower_train_step(phases[0]).as_text()


def test_the_tpu_program_carries_no_cpu_only_kernel(v5e):
  """The transposes-behind-barriers of ops._weight_grad and dropout's hash barrier are XLA CPU
  layouts: lowered for a TPU topology on this CPU host they must be absent, on the CPU present."""
  cfg = _cfg()
  assert "optimization_barrier" not in _lowered_text(cfg, v5e.devices)
  assert "optimization_barrier" in _lowered_text(cfg, jax.devices("cpu")[:1])


def test_mesh_on_a_v5e_4x4_is_topology_aware():
  """data 4 x fsdp 2 x tensor 2 needs a physical axis split over mesh axes; the tensor pairs
  must be physical neighbours, with no fallback warning."""
  devices = plan.load_target("v5e:4x4").devices
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    mesh = sharding.make_mesh(4, 2, 2, devices=devices)
  for pair in mesh.devices.reshape(-1, 2):
    a, b = (np.asarray(d.coords) for d in pair)
    assert np.abs(a - b).sum() == 1, (a, b)


def test_mesh_fallback_warns_with_the_shapes(monkeypatch):
  from jax.experimental import mesh_utils
  devices = plan.load_target("v5e:2x2").devices

  def refuse(*args, **kwargs):
    raise ValueError("Failed to find assignment for logical_axis_index 2")
  monkeypatch.setattr(mesh_utils, "create_device_mesh", refuse)
  with pytest.warns(UserWarning, match=r"mesh \{'data': 2, 'fsdp': 1, 'tensor': 2\}.*4 TPU v5"):
    mesh = sharding.make_mesh(2, 1, 2, devices=devices)
  assert list(mesh.devices.flat) == devices


def _param_count(cfg):
  model_config = plan.model_config_of(cfg)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  abstract = steps.Pretraining(model_config, cfg, mesh, plan.make_phases(cfg)).abstract_state
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))


@pytest.mark.parametrize("topology,fsdp", [
    ("v5e:2x2", 1), pytest.param("v4:2x2x1", 2, marks=pytest.mark.slow)])
def test_plan_compiles_and_its_figures_match_the_analytic_ones(topology, fsdp):
  # 256 wide: 128-wide shards of a 2 x 128 BERT would be padded to TPU tiles, 20% more bytes.
  cfg = _cfg(("mesh.fsdp", str(fsdp)), ("model.preset", "L-2_H-256"))
  target = plan.load_target(topology)
  report = plan.plan(cfg, target, None, 0.4)
  (phase,) = report["phases"]
  assert report["fits"] and phase["fits"]
  assert report["attention"] == ("attention on tpu: training fused Pallas kernel (attention "
                                 "dropout 0.1 inside the kernel), evaluation fused splash kernel")
  assert phase["mesh"] == {"data": 4 // fsdp, "fsdp": fsdp, "tensor": 1}
  # float32 params + AdamW's two float32 moments, split fsdp ways (the batch is tiny).
  analytic = 3 * 4 * _param_count(cfg) / fsdp
  assert phase["memory"]["arguments"] == pytest.approx(analytic, rel=0.05)
  flops = phase["flops"]
  assert flops["compiled_per_chip"] == pytest.approx(flops["model_per_chip"], rel=0.10)
  bound, at_mfu = phase["bound"], phase["at_mfu"]
  assert bound["step_s"] == pytest.approx(flops["compiled_per_chip"] / target.peak_flops)
  assert at_mfu["step_s"] == pytest.approx(flops["model_per_chip"] / (0.4 * target.peak_flops))
  assert at_mfu["phase_s"] == pytest.approx(100 * at_mfu["step_s"])
  assert report["schedule_s"] == pytest.approx(at_mfu["phase_s"])


@pytest.mark.slow  # a further TPU compile
def test_remat_shows_as_recompute(v5e):
  (phase,) = plan.plan(_cfg(("model.remat", "True")), v5e, None, 0.4)["phases"]
  assert phase["flops"]["ratio"] > 1.15  # the forward pass again in the backward pass


@pytest.mark.slow  # two further TPU compiles
def test_accumulated_flops_scale_with_the_micro_batches(v5e):
  """XLA counts a scanned body once; the plan's figure must be 4x for 4 micro-batches."""
  one = plan.plan(_cfg(), v5e, None, 0.4)["phases"][0]["flops"]["compiled_per_chip"]
  four = plan.plan(_cfg(("phases.0.batch_size", "64"), ("phases.0.grad_accum", "4")), v5e,
                   None, 0.4)["phases"][0]["flops"]["compiled_per_chip"]
  assert four == pytest.approx(4 * one, rel=0.03)


def _gpu_plan_without_memory_fraction(monkeypatch):
  """Skips where jax's CUDA plugin cannot compile for a GPU here; clears the allocator's
  memory fraction from the environment."""
  from bert_jax.devices import gpu_targets
  try:
    gpu_targets.devices("h100:1")
  except RuntimeError as e:
    pytest.skip(str(e))
  for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
    monkeypatch.delenv(name, raising=False)


def test_plan_compiles_for_nvidia_gpus_without_one(capsys, monkeypatch):
  """h100:2 (one host of two): the step compiled on this CPU host from a description of the
  GPU (jax's CUDA plugin). XLA counts no FLOPs there: the report says so and times the step by
  the model's FLOPs, and bounds it by its kernels too (devices/roofline.py): each at the H100's
  HBM bandwidth or peak, slower than the matmuls alone."""
  from bert_jax.devices import gpu_targets
  _gpu_plan_without_memory_fraction(monkeypatch)
  assert plan.main(["--config", TINY, "--topology", "h100:2", "--phase", "1", "--json",
                    "--config.model.attention=xla"] + [f"--config.{k}={v}" for k, v in SHORT]) == 0
  report = json.loads(capsys.readouterr().out)
  (phase,) = report["phases"]
  assert report["target"]["kind"] == gpu_targets.GPUS["h100"].device_name
  # what jax's allocator takes of the 80 GiB by default, as a live GPU's bytes_limit says
  assert report["target"]["memory_per_chip"] == 0.75 * 80 * 2**30 and phase["fits"]
  assert report["target"]["memory_fraction"] == 0.75
  assert phase["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
  assert phase["memory"]["arguments"] == pytest.approx(3 * 4 * _param_count(_cfg()), rel=0.05)
  flops = phase["flops"]
  assert flops["compiled_per_chip"] is None and flops["ratio"] is None
  assert phase["bound"]["step_s"] == pytest.approx(flops["model_per_chip"] / 989e12)
  assert phase["roofline"]["step_s"] > phase["bound"]["step_s"]
  assert phase["roofline"]["mfu"] == pytest.approx(
      phase["bound"]["step_s"] / phase["roofline"]["step_s"])
  report["config"] = ""
  text = plan.format_report(report)
  assert "compiled ? (the compiler counts none)" in text and "at the roofline" in text
  assert report["attention"].startswith("attention on gpu: training unfused XLA")


@pytest.mark.parametrize("name, value, expected", [
    ("XLA_CLIENT_MEM_FRACTION", "0.92", 0.92 * 80 * 2**30),
    ("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5", 0.5 * 80 * 2**30),
    ("XLA_CLIENT_MEM_FRACTION", "1.5", None), ("XLA_PYTHON_CLIENT_MEM_FRACTION", "abc", None)])
def test_a_gpu_targets_memory_is_the_allocators_share(monkeypatch, name, value, expected):
  """A run's allocator takes XLA_CLIENT_MEM_FRACTION of each GPU (launch/gpu_pretrain.sh sets
  0.92): planned for, a GPU holds that share; a value jax cannot take is one line, exit 2, where
  jax's CUDA plugin would fail to start with a traceback."""
  _gpu_plan_without_memory_fraction(monkeypatch)
  monkeypatch.setenv(name, value)
  if expected is None:
    with pytest.raises(UserError, match=f"{name}={value}: expected a fraction"):
      plan.load_target("h100:1")
  else:
    assert plan.load_target("h100:1").memory_per_chip == pytest.approx(expected)


def test_cudnn_attention_on_a_gpu_plan_without_cudnn_is_one_line_and_exit_2(capsys):
  """Attention dropout 0 in bfloat16 takes cuDNN on a GPU; jax asks the cuDNN library for its
  version while tracing, so a host without it cannot plan that step: one line naming the
  attention settings that can be planned."""
  from bert_jax.devices import gpu_targets
  try:
    gpu_targets.devices("h100:1")
  except RuntimeError as e:
    pytest.skip(str(e))
  from jax._src.lib import cuda_versions  # what jax asks while tracing
  try:
    cuda_versions.cudnn_get_version()
    pytest.skip("cuDNN is installed here: the step plans")
  except RuntimeError:
    pass
  code = plan.main(["--config", TINY, "--topology", "h100:1", "--phase", "1",
                    "--config.model.dtype=bfloat16",
                    "--config.model.overrides.attention_probs_dropout_prob=0.0"]
                   + [f"--config.{k}={v}" for k, v in SHORT])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and err[-1].startswith("error: --topology h100:1: attention through cuDNN")
  assert "--config.model.attention=pallas or =xla" in err[-1]


def test_does_not_fit_exits_3_with_a_suggestion(capsys):
  """model.remat auto tried the step without remat, then with dots, then took full remat; none
  fits."""
  code = plan.main(["--config", TINY, "--topology", "v5e:2x2", "--phase", "2",
                    "--config.phases.1.batch_size=16384", "--json"])
  (phase,) = json.loads(capsys.readouterr().out)["phases"]
  assert code == plan.EXIT_DOES_NOT_FIT and not phase["fits"]
  assert phase["remat"] is True and phase["remat_auto"].startswith("remat on: ")
  # XLA TPU refuses the programs below full remat: more than the chip holds
  assert phase["remat_auto"] == ("remat on: too large to compile without remat, too large to "
                                 "compile with dots, of 16.00 GiB per chip")
  assert not any("remat" in s for s in phase["suggestions"])
  assert any(s.startswith("--config.phases.1.grad_accum=") for s in phase["suggestions"])


@pytest.mark.parametrize("remat, suggested", [("False", True), ("True", False), ("auto", False)])
def test_remat_is_suggested_only_where_it_is_off(remat, suggested):
  cfg = _cfg(("model.remat", remat))
  (phase,) = plan.make_phases(cfg)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  memory = dict(capacity=16 * 2**30, peak=20 * 2**30, params=2**20, opt_state=2**21, batch=2**10,
                temporaries=19 * 2**30)
  out = plan.suggestions(cfg, phase, mesh, memory)
  assert any(s.startswith("--config.model.remat=auto") for s in out) is suggested


@pytest.mark.parametrize("argv,message", [
    (["--topology", "v5x:2x2"], "--topology v5x:2x2: "),
    (["--topology", "v5e"], "expected a TPU topology"),
    (["--topology", "h900:8"], "a GPU one (a100, h100, h200: h100:8, h100:2x8)"),
    (["--topology", "local", "--phase", "3"], "--phase 3: expected a phase number 1..2"),
    (["--topology", "local", "--config.phases.0.batch_size=0"], "batch_size=0"),
    # checked before any compile: 32 rows in 16 micro-batches of 2 over 4 chips
    (["--topology", "v5e:2x2", "--config.phases.0.grad_accum=16"], "does not split over"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
  assert plan.main(["--config", TINY] + argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.slow  # three `bert-jax plan` processes
def test_local_and_two_plans_at_once_on_one_machine():
  """`local` compiles for this host's CPU; two TPU plans in two processes at once both load
  libtpu (ALLOW_MULTIPLE_LIBTPU_LOAD)."""
  base = [sys.executable, "-m", "bert_jax.pretraining.plan", "--config", TINY, "--phase", "1", "--json",
          "--config.phases.0.seq_len=64", "--config.phases.0.max_predictions=10"]
  procs = [subprocess.Popen(base + ["--topology", t], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
           for t in ("v5e:2x2", "v4:2x2x1", "local")]
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert '"fits": true' in out
