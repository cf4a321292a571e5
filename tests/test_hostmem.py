"""The training commands re-execute themselves once with glibc's huge-page malloc tunable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bert_jax.devices import hostmem

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables are Linux-only")

# Prints its pid and GLIBC_TUNABLES, then runs `bert-jax pretrain --help` as the console script.
SCRIPT = """
import os, sys
print("run", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), flush=True)
sys.argv = ["bert-jax", "pretrain", "--help"]
from bert_jax import cli
cli.main()
"""


def _runs(extra_env):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
  env.update(extra_env)
  # A CPU run unless the test names another platform (on a GPU or TPU host jax would not train
  # on the CPU, and the tunable is for CPU training only).
  env["JAX_PLATFORMS"] = extra_env.get("JAX_PLATFORMS", "cpu")
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert "usage" in out.stdout  # the command itself ran, once
  return [line.split(" ", 2)[1:] for line in out.stdout.splitlines() if line.startswith("run ")]


def test_with_huge_pages_keeps_other_tunables_and_adds_once():
  env = hostmem.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{hostmem.TUNABLE}"
  assert hostmem.with_huge_pages(env) == env
  assert hostmem.with_huge_pages({})["GLIBC_TUNABLES"] == hostmem.TUNABLE


def test_pretrain_command_reexecutes_once_in_place_with_the_tunable():
  runs = _runs({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
  assert len(runs) == 2
  (pid1, tunables1), (pid2, tunables2) = runs
  assert pid1 == pid2  # exec, not a child process
  assert tunables1 == "glibc.malloc.arena_max=4"
  assert tunables2 == f"glibc.malloc.arena_max=4:{hostmem.TUNABLE}"


def test_opt_out_and_already_set_run_once():
  assert len(_runs({hostmem.OPT_OUT: "1"})) == 1
  assert len(_runs({"GLIBC_TUNABLES": hostmem.TUNABLE})) == 1


def test_no_reexec_where_jax_runs_on_an_accelerator():
  """JAX_PLATFORMS naming an accelerator (as on a TPU or GPU host) means no CPU training."""
  assert len(_runs({"JAX_PLATFORMS": "tpu"})) == 1
  assert len(_runs({"JAX_PLATFORMS": "cuda"})) == 1
  assert len(_runs({"JAX_PLATFORMS": "cpu"})) == 2


def test_plan_command_reexecutes_once_with_deep_thread_stacks():
  """libtpu's compiler overflowed its stack on a v6e length-512 compile unless RLIMIT_STACK
  was unlimited: plan raises the soft limit to the hard one."""
  import resource
  code = ("import resource, sys\n"
          "print('run', resource.getrlimit(resource.RLIMIT_STACK)[0], flush=True)\n"
          "sys.argv = ['bert-jax', 'plan', '--help']\n"
          "from bert_jax import cli\n"
          "cli.main()\n")
  soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
  if soft == hard:
    pytest.skip("the soft stack limit is the hard one already")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  limits = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("run ")]
  assert limits == [soft, hard]
