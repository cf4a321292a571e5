"""launch/*.sh: --dry-run output of the TPU and GPU launchers, and shellcheck on launch/."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO_ROOT / "launch" / "tpu_pretrain.sh"
GPU = REPO_ROOT / "launch" / "gpu_pretrain.sh"
CONFIG = "configs/bert_base_paper.py"
TPU_ARGS = ["--tpu", "bert-pod", "--zone", "us-central2-b", "--project", "my-proj",
            "--accelerator-type", "v4-32", "--bucket", "gs://my-bucket",
            "--config", CONFIG, "--run-name", "base-wiki",
            "--data", "tfds:wikipedia/20230601.en", "--dry-run"]


def _fake_gcloud(tmp_path: pathlib.Path, describe_state: str | None) -> dict[str, str]:
  """A PATH whose `gcloud` logs its argv; `describe` prints the state or fails when None."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  log = tmp_path / "gcloud.log"
  describe = (f'echo "{describe_state}"; exit 0' if describe_state is not None
              else 'echo "ERROR: NOT_FOUND" >&2; exit 1')
  script = bin_dir / "gcloud"
  script.write_text(
      "#!/usr/bin/env bash\n"
      f'echo "$*" >> {shlex.quote(str(log))}\n'
      f'if [[ " $* " == *" describe "* ]]; then {describe}; fi\n'
      "exit 0\n")
  script.chmod(0o755)
  env = dict(os.environ)
  env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
  env.pop("SLURM_JOB_ID", None)
  return env


def _run(script: pathlib.Path, args: list[str], env: dict[str, str]) -> list[str]:
  # run as the README shows them, so a launcher that lost its executable bit fails here
  proc = subprocess.run([str(script), *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.splitlines()


def _commands(lines: list[str]) -> list[list[str]]:
  """The "+ " lines parsed back into argv lists (so quoting is checked too)."""
  return [shlex.split(line[2:]) for line in lines if line.startswith("+ ")]


def _find(commands: list[list[str]], *prefix: str) -> list[list[str]]:
  return [c for c in commands if c[:len(prefix)] == list(prefix)]


def test_tpu_creates_vm_when_describe_fails(tmp_path):
  env = _fake_gcloud(tmp_path, describe_state=None)
  commands = _commands(_run(TPU, TPU_ARGS + ["--spot", "--", "--config.total_steps=200"], env))
  tpu = ("gcloud", "compute", "tpus", "tpu-vm")
  (create,) = _find(commands, *tpu, "create")
  assert create[5] == "bert-pod"
  assert {"--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v4-32",
          "--spot"} <= set(create)
  assert any(a.startswith("--version=") for a in create)
  # --dry-run ran only the read-only describe; nothing was created.
  log = (tmp_path / "gcloud.log").read_text()
  assert "describe" in log and "create" not in log and "ssh" not in log

  # The checkout goes to every worker and is pip-installed there.
  (scp,) = _find(commands, *tpu, "scp")
  assert "--worker=all" in scp
  assert scp[5].endswith(".tar.gz") and scp[6] == "bert-pod:bert-jax.tar.gz"
  ssh = _find(commands, *tpu, "ssh")
  assert len(ssh) == 2 and all("--worker=all" in c for c in ssh)
  install = next(a for a in ssh[0] if a.startswith("--command="))
  assert "pip install" in install and "jax[tpu]" in install

  # pretrain runs on all workers with the bucket as workdir, the data and the extra override.
  remote = next(a for a in ssh[1] if a.startswith("--command="))[len("--command="):]
  pretrain = shlex.split(remote.split("; ")[-1])
  assert pretrain[:2] == ["bert-jax", "pretrain"]
  assert f"--config={CONFIG}" in pretrain
  assert "--workdir=gs://my-bucket/runs/base-wiki" in pretrain
  assert '--config.data.input=["tfds:wikipedia/20230601.en"]' in pretrain
  assert pretrain[-1] == "--config.total_steps=200"
  assert "TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets" in remote
  # Order: create, copy, install, train.
  order = [commands.index(c) for c in (create, scp, ssh[0], ssh[1])]
  assert order == sorted(order)


def test_tpu_reuses_existing_vm(tmp_path):
  env = _fake_gcloud(tmp_path, describe_state="READY")
  lines = _run(TPU, TPU_ARGS, env)
  commands = _commands(lines)
  assert not _find(commands, "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert any("reusing TPU VM bert-pod" in line for line in lines)
  ssh = _find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
  assert [("--worker=all" in c) for c in ssh] == [True, True]
  assert "bert-jax pretrain" in ssh[-1][-1]


def test_tpu_recreates_preempted_vm_and_installs_from_pip_spec(tmp_path):
  env = _fake_gcloud(tmp_path, describe_state="PREEMPTED")
  spec = "bert-jax[gcs] @ git+https://example.com/bert-jax.git@v0.1.0"
  commands = _commands(_run(TPU, TPU_ARGS + ["--pip-spec", spec], env))
  tpu = ("gcloud", "compute", "tpus", "tpu-vm")
  delete, create = _find(commands, *tpu, "delete"), _find(commands, *tpu, "create")
  assert len(delete) == 1 and len(create) == 1
  assert commands.index(delete[0]) < commands.index(create[0])
  installs = [a for c in _find(commands, *tpu, "ssh") for a in c if "pip install" in a]
  assert len(installs) == 1 and spec in shlex.split(installs[0])


@pytest.mark.parametrize("bad, message", [
    (["--bucket", "my-bucket"], "--bucket expects a gs:// URL"),
    (["--config", "configs/nope.py"], "--config: no such file"),
    (["--frobnicate"], "unknown flag --frobnicate"),
])
def test_tpu_bad_flags_exit_2(tmp_path, bad, message):
  env = _fake_gcloud(tmp_path, describe_state=None)
  proc = subprocess.run(["bash", str(TPU), *TPU_ARGS, *bad], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert message in proc.stderr.splitlines()[-1]
  assert not (tmp_path / "gcloud.log").exists() or "create" not in (
      tmp_path / "gcloud.log").read_text()


def test_gpu_single_node(tmp_path):
  env = _fake_gcloud(tmp_path, describe_state=None)
  (cmd,) = _commands(_run(GPU, ["--config", CONFIG, "--workdir", "runs/base", "--data",
                                "corpus/a.txt,corpus/b.txt", "--dry-run", "--",
                                "--config.mesh.data=-1"], env))
  start = cmd.index("bert-jax")
  assert cmd[start:start + 4] == ["bert-jax", "pretrain", f"--config={CONFIG}",
                                  "--workdir=runs/base"]
  assert '--config.data.input=["corpus/a.txt","corpus/b.txt"]' in cmd
  assert cmd[-1] == "--config.mesh.data=-1"
  assert "srun" not in cmd


@pytest.mark.parametrize("user_env, expected", [
    ({}, "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92"),
    ({"XLA_CLIENT_MEM_FRACTION": "0.5"}, None),  # jax refuses both names at once
    ({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.6"}, None),
])
def test_gpu_memory_fraction_is_the_users_when_set(tmp_path, user_env, expected):
  env = _fake_gcloud(tmp_path, describe_state=None)
  for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
    env.pop(name, None)
  env.update(user_env)
  (cmd,) = _commands(_run(GPU, ["--config", CONFIG, "--workdir", "runs/base", "--dry-run"], env))
  fractions = [word for word in cmd[:cmd.index("bert-jax")] if "MEM_FRACTION=" in word]
  assert fractions == ([expected] if expected else [])


def test_gpu_slurm_writes_sbatch_script_with_srun(tmp_path):
  env = _fake_gcloud(tmp_path, describe_state=None)
  sbatch_file = tmp_path / "job.sbatch"
  lines = _run(GPU, ["--slurm", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                     "--time", "48:00:00", "--config", CONFIG, "--workdir", "/shared/runs/base",
                     "--sbatch-file", str(sbatch_file), "--dry-run"], env)
  assert not sbatch_file.exists()  # --dry-run writes nothing
  script = [line.strip() for line in lines if line.startswith("    ")]
  for directive in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                    "--partition=gpu", "--time=48:00:00", "--requeue"):
    assert f"#SBATCH {directive}" in script
  (srun,) = [shlex.split(line) for line in script if line.startswith("srun ")]
  assert {"--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8"} <= set(srun)
  start = srun.index("bert-jax")
  assert srun[start:start + 4] == ["bert-jax", "pretrain", f"--config={CONFIG}",
                                   "--workdir=/shared/runs/base"]
  assert _commands(lines) == [["sbatch", str(sbatch_file)]]


def test_gpu_slurm_inside_allocation_runs_srun(tmp_path):
  env = _fake_gcloud(tmp_path, describe_state=None)
  env["SLURM_JOB_ID"] = "1234"
  (cmd,) = _commands(_run(GPU, ["--slurm", "--nodes", "2", "--gpus-per-node", "4", "--config",
                                CONFIG, "--workdir", "/shared/runs/base", "--dry-run"], env))
  srun = cmd[cmd.index("srun"):]
  assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4"} <= set(srun)
  assert srun[srun.index("bert-jax") + 1] == "pretrain"


def test_shellcheck_passes_on_launch_scripts():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed")
  scripts = sorted(str(p) for p in (REPO_ROOT / "launch").glob("*.sh"))
  assert scripts
  proc = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
