"""Finding this host's accelerator without jax: PCI vendors, JAX_PLATFORMS, installed plugins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bert_jax import platforms


def _pci(root, *devices):
  root.mkdir(parents=True)
  for i, (vendor, klass) in enumerate(devices):
    d = root / f"0000:00:{i:02d}.0"
    d.mkdir()
    (d / "vendor").write_text(vendor + "\n")
    (d / "class").write_text(klass + "\n")
  return root


@pytest.fixture
def host(monkeypatch, tmp_path):
  """Set the PCI devices and the installed modules of a pretend host."""
  hosts = iter(range(100))

  def make(devices, installed=()):
    root = tmp_path / f"host{next(hosts)}"
    monkeypatch.setattr(platforms, "_PCI_DEVICES", _pci(root, *devices))
    monkeypatch.setattr(platforms, "_installed", lambda name: name in installed)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  return make


VIRTIO, INTEL = ("0x1af4", "0x010000"), ("0x8086", "0x060000")
TPU, NVIDIA_GPU, NVIDIA_BRIDGE = ("0x1ae0", "0x120000"), ("0x10de", "0x030200"), \
    ("0x10de", "0x068000")


def test_cpu_host_with_libtpu_installed(host):
  host([VIRTIO, INTEL], installed=("libtpu",))
  assert platforms.accelerators_on_host() == set()
  assert platforms.default_platform() == "cpu"


def test_tpu_host_needs_chips_and_libtpu(host):
  host([TPU, INTEL], installed=("libtpu",))
  assert platforms.default_platform() == "tpu"
  host([TPU, INTEL], installed=())
  assert platforms.default_platform() == "cpu"


def test_gpu_host_needs_a_gpu_and_a_plugin(host):
  host([NVIDIA_GPU], installed=("jax_cuda12_plugin",))
  assert platforms.default_platform() == "gpu"
  host([NVIDIA_BRIDGE], installed=("jax_cuda12_plugin",))  # an NVIDIA bridge is no GPU
  assert platforms.default_platform() == "cpu"


def test_jax_platforms_wins(host, monkeypatch):
  host([TPU], installed=("libtpu",))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert platforms.default_platform() == "cpu"
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert platforms.default_platform() == "gpu"


def test_importing_bert_jax_keeps_jax_off_an_absent_tpu():
  """With libtpu installed on a CPU host, jax starts on the CPU without libtpu's error lines."""
  pytest.importorskip("libtpu")
  if platforms.accelerators_on_host():
    pytest.skip("this host has an accelerator")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = "import bert_jax, jax; print(jax.devices()[0].platform, flush=True)"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "cpu"
  assert out.stderr == ""
