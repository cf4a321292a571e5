"""tools/device_check.sh in its CPU mode (tiny shapes): the GPU check cannot rot unnoticed."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  assert report["plan"]["phases"][0]["fits"] in (True, False)
