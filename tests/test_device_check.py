"""tools/device_check.sh in its CPU mode (tiny shapes): the GPU check cannot rot unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import kernel_profile  # noqa: E402


def _gpu_like_trace():
  """Two steps on a GPU as jax.profiler writes them: kernels on two streams (one overlapping
  another), the derived XLA Ops line repeating them, and host events."""
  meta = lambda pid, tid, kind, name: dict(ph="M", pid=pid, tid=tid, name=kind,
                                           args=dict(name=name))
  kernel = lambda tid, ts, dur, name, op: dict(ph="X", pid=2, tid=tid, ts=ts, dur=dur,
                                               name=name, args=dict(hlo_op=op))
  events = [meta(1, 0, "process_name", "/host:CPU"), meta(2, 0, "process_name", "/device:GPU:0"),
            meta(2, 7, "thread_name", "Stream #7(Compute)"),
            meta(2, 9, "thread_name", "Stream #9(MemcpyD2D)"),
            meta(2, 99, "thread_name", "XLA Ops"),
            dict(ph="X", pid=1, tid=0, ts=0, dur=5000, name="PjitFunction(train_step)")]
  for step in range(2):
    t = step * 1000
    events += [kernel(7, t, 300, "nvjet_tst_128x256", "gemm_fusion_dot.3"),
               kernel(7, t + 300, 100, "loop_add_fusion_2", "loop_add_fusion.2"),
               kernel(7, t + 400, 200, "_dkv_kernel", "custom-call.5"),
               kernel(9, t + 350, 100, "memcpy", "copy.4"),  # overlaps the add
               kernel(99, t, 600, "gemm_fusion_dot.3", "gemm_fusion_dot.3")]
  return dict(traceEvents=events)


def test_kernel_profile_counts_stream_kernels_once_per_step():
  summary = kernel_profile.summarize(_gpu_like_trace(), steps=2)
  assert summary["kernels_per_step"] == 4  # the XLA Ops line is not counted again
  assert summary["kinds_ms"] == {"matmul": 0.3, "attention": 0.2, "other": 0.1, "copy": 0.1}
  assert summary["busy_ms"] == 0.6  # the copy overlaps the add: counted once
  assert summary["idle_ms"] == 0.2  # the gap between the two steps, per step
  assert summary["top"][0] == dict(name="gemm_fusion_dot.3", kind="matmul", ms=0.3, calls=1.0)
  assert "busy 0.60 ms" in kernel_profile.format_summary(summary)


@pytest.mark.slow
def test_device_check_cpu_mode_writes_one_json_of_every_case(tmp_path):
  proc = subprocess.run(["bash", "tools/device_check.sh", "--cpu", "--out", str(tmp_path)],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  report = json.loads((tmp_path / "device_check.json").read_text())
  assert report["mode"] == "cpu"
  cases = {c["case"]: c for c in report["cases"]}
  assert set(cases) == {"tiny_64x4_fast", "tiny_64x4_xla"}
  for case in cases.values():
    assert case["sequences_per_s"] > 0 and case["tokens_per_s"] == pytest.approx(
        64 * case["sequences_per_s"])
    assert 0 < case["mfu"] < 1
    assert "unfused XLA" in case["attention"]  # a CPU has no fused kernel
    profile = case["profile"]  # one traced step, XLA's CPU thunks standing in for kernels
    assert profile["busy_ms"] > 0 and profile["top"] and sum(profile["kinds_ms"].values()) > 0
  # attention alone, with and without dropout: the XLA path and the kernel (interpreted here)
  # timed, and cuDNN, which a CPU lacks, reported with its error rather than stopping the run
  alone = {(row["implementation"], row["rate"]): row for row in report["attention_alone"]}
  assert set(alone) == {("xla", 0.1), ("pallas", 0.1), ("xla", 0.0), ("pallas", 0.0),
                        ("cudnn", 0.0)}
  for impl in ("xla", "pallas"):
    for rate in (0.1, 0.0):
      assert alone[impl, rate]["step_ms"] > 0 and "error" not in alone[impl, rate]
  assert "error" in alone["cudnn", 0.0] and "step_ms" not in alone["cudnn", 0.0]
  assert report["plan"]["phases"][0]["fits"] in (True, False)
  # two files, as a lent machine sends back at most eight: the report and the logs
  assert sorted(os.listdir(tmp_path)) == ["device_check.json", "device_check_logs.tar.gz"]
  with tarfile.open(tmp_path / "device_check_logs.tar.gz") as logs:
    names = {os.path.basename(n) for n in logs.getnames()}
  assert {"tiny_64x4_fast.log", "tiny_64x4_xla.log", "attention_0.1.log", "plan.log"} <= names


def test_device_check_past_its_budget_still_writes_the_report(tmp_path):
  """A lent machine's minutes are few: steps that would start past --budget are skipped and
  recorded, and the JSON comes out all the same."""
  proc = subprocess.run(["bash", "tools/device_check.sh", "--cpu", "--budget", "0", "--out",
                         str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  report = json.loads((tmp_path / "device_check.json").read_text())
  assert {c["case"] for c in report["cases"]} == {"tiny_64x4_fast", "tiny_64x4_xla"}
  assert all("budget of 0 s ran out" in c["error"] for c in report["cases"])
  # the GPU mode's steps too (run here on the CPU, where the budget stops every one of them)
  gpu = subprocess.run(["bash", "tools/device_check.sh", "--budget", "0", "--out",
                        str(tmp_path / "gpu")], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                             PYTHON=sys.executable))
  assert gpu.returncode == 1, gpu.stdout + gpu.stderr
  report = json.loads((tmp_path / "gpu" / "device_check.json").read_text())
  assert len(report["cases"]) == 9  # 3 shapes x (xla, fast, pallas)
  assert all("budget of 0 s ran out" in c["error"] for c in report["cases"])
  assert report["tests_attention"].startswith("skipped") and report["mode"] == "gpu"
  bad = subprocess.run(["bash", "tools/device_check.sh", "--budget", "soon"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--budget soon" in bad.stderr
