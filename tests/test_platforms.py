"""Finding this host's accelerator without jax: PCI vendors, JAX_PLATFORMS, installed plugins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bert_jax.devices import platforms


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


@pytest.mark.parametrize("devices,installed,pinned", [
    ([INTEL], ("libtpu",), True),                          # the test extra on a CPU host
    ([INTEL], ("jax_cuda13_plugin",), True),               # plan-gpu on a CPU host
    ([INTEL, NVIDIA_GPU], ("libtpu", "jax_cuda13_plugin"), False),
    ([INTEL, NVIDIA_GPU], ("libtpu",), True),              # check_install refuses it later
    ([INTEL, TPU], ("libtpu",), False),
    ([INTEL], (), False),                                  # nothing to keep jax from
])
def test_jax_starts_on_the_cpu_where_no_installed_backend_has_its_chips(
    host, monkeypatch, devices, installed, pinned):
  host(devices, installed=installed)
  monkeypatch.delenv(platforms._PINNED, raising=False)
  monkeypatch.setattr(platforms, "sys", type("Sys", (), {"modules": {}}))  # jax: not yet
  platforms.skip_absent_accelerators()
  assert (os.environ.get("JAX_PLATFORMS") == "cpu") == pinned
  assert bool(os.environ.get(platforms._PINNED)) == pinned


def test_a_gpu_plugin_on_an_unreadable_pci_bus_lets_jax_look(host, monkeypatch, tmp_path):
  host([INTEL], installed=("jax_cuda13_plugin",))
  monkeypatch.setattr(platforms, "_PCI_DEVICES", tmp_path / "no-sysfs")
  platforms.skip_absent_accelerators()
  assert "JAX_PLATFORMS" not in os.environ


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


# ----------------------------------------------------------------------------- install check

def _pretrain_exit(argv, capsys):
  from bert_jax.pretraining import train
  code = train.main(argv)
  return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("device", [NVIDIA_GPU, TPU])
def test_an_accelerator_host_with_a_cpu_only_jax_stops_with_the_install(host, capsys, tmp_path,
                                                                       monkeypatch, device):
  """pretrain, finetune and plan --topology local: one line naming the install, exit 2, before
  any work (the workdir is never made); JAX_PLATFORMS=cpu still runs on the CPU."""
  from bert_jax.pretraining import plan
  from bert_jax.finetune.__main__ import main as finetune_main
  host([INTEL, device])
  monkeypatch.delenv(platforms._PINNED, raising=False)
  workdir = tmp_path / "run"
  code, err = _pretrain_exit(["--config", "configs/tiny_cpu.py", "--workdir", str(workdir)],
                             capsys)
  kind = "tpu" if device == TPU else "gpu"
  assert code == 2 and len(err) == 1 and platforms.INSTALLS[kind] in err[0], err
  assert not workdir.exists()
  assert finetune_main(["--task", "classification", "--init", "random", "--train-file", "x",
                        "--validation-file", "y", "--output-dir", str(tmp_path / "o")]) == 2
  assert platforms.INSTALLS[kind] in capsys.readouterr().err
  assert plan.main(["--config", "configs/tiny_cpu.py", "--topology", "local"]) == 2
  assert platforms.INSTALLS[kind] in capsys.readouterr().err
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the user's own choice: no check
  platforms.check_install("pretrain")
  host([INTEL, device], installed=("libtpu", "jax_cuda12_plugin"))  # the right jax
  platforms.check_install("pretrain")


def test_our_own_cpu_pin_does_not_hide_a_gpu(host, monkeypatch):
  """skip_absent_accelerators pins a host without a TPU to the CPU; on a GPU host without the CUDA
  plugin that pin must not pass for the user's JAX_PLATFORMS=cpu."""
  host([NVIDIA_GPU], installed=("libtpu",))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv(platforms._PINNED, "1")
  with pytest.raises(platforms_errors().UserError, match=r"bert-jax\[cuda\]"):
    platforms.check_install("pretrain")


def platforms_errors():
  from bert_jax import errors
  return errors


# ----------------------------------------------------------------------------- precision

class _Device:
  def __init__(self, platform, kind="", capability=None):
    self.platform, self.device_kind = platform, kind
    if capability is not None:
      self.compute_capability = capability


@pytest.mark.parametrize("device,flags,dtype", [
    (_Device("tpu", "TPU v5 lite"), set(), "bfloat16"),
    (_Device("gpu", "NVIDIA H200", "9.0"), set(), "bfloat16"),
    (_Device("gpu", "NVIDIA A100-SXM4-80GB", "8.0"), set(), "bfloat16"),
    (_Device("gpu", "Tesla V100-SXM2-16GB", "7.0"), set(), "float32"),
    (_Device("gpu", "Tesla T4", "7.5"), set(), "float32"),
    (_Device("cpu", "cpu"), {"avx2", "amx_bf16", "amx_tile"}, "bfloat16"),
    (_Device("cpu", "cpu"), {"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
    (_Device("cpu", "cpu"), {"avx2", "avx512f"}, "float32"),
])
def test_auto_dtype_follows_the_hardware(monkeypatch, device, flags, dtype):
  monkeypatch.setattr(platforms, "cpu_flags", lambda: flags)
  assert platforms.compute_dtype("auto", device) == dtype
  assert platforms.compute_dtype("float32", device) == "float32"  # a named dtype stands
  assert dtype in platforms.describe_dtype("auto", device)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 amx_bf16\n\nprocessor\t: 1\n")
  assert platforms.cpu_flags(str(info)) == {"fpu", "sse", "avx2", "amx_bf16"}
  assert platforms.cpu_flags(str(tmp_path / "absent")) == set()
