"""Host memory of the commands: huge pages for CPU training, deep thread stacks for compiling.

Huge pages. 
XLA CPU allocates each step's temporaries afresh (BERT-mini at batch 32: one 700 MB block,
mapped and unmapped every step). With 4 KiB pages that is ~190,000 page faults per step, about
a fifth of the step on a 2-core CPU; glibc's `glibc.malloc.hugetlb=1` tunable makes malloc
request 2 MiB transparent huge pages (~900 faults per step). glibc reads tunables only at
start-up, so the `bert-jax pretrain` / `finetune` commands re-execute themselves once with it
set (same process id and arguments), when they will train on the CPU (on a TPU or GPU host the
step's memory is the accelerator's). BERT_JAX_NO_HUGEPAGES=1 turns this off.

Thread stacks. libtpu's compiler overflows its stack (SIGSEGV, "stack overflow" in a compiler
fiber) compiling BERT-base's length-512 step for v6e under the usual 8 MiB RLIMIT_STACK, and
also under 256 MiB; with the limit unlimited it compiles. The limit is read at start-up, so
`bert-jax plan` re-executes itself with the soft limit raised to the hard one.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from typing import Mapping

from bert_jax.devices import platforms

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "BERT_JAX_NO_HUGEPAGES"


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
  """`env` with TUNABLE added to GLIBC_TUNABLES (other tunables kept)."""
  env = dict(env)
  current = env.get("GLIBC_TUNABLES", "")
  if TUNABLE not in current.split(":"):
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
  return env


def reexec_with_huge_pages() -> None:
  """Re-executes this command with TUNABLE set, unless it is set already, opted out, this is
  not Linux with glibc, or jax will run on an accelerator here. Call it only at a program's
  entry, before any work."""
  if (sys.platform != "linux" or os.environ.get(OPT_OUT)
      or platform.libc_ver()[0] != "glibc" or platforms.default_platform() != "cpu"):
    return
  env = with_huge_pages(os.environ)
  if env.get("GLIBC_TUNABLES") != os.environ.get("GLIBC_TUNABLES"):
    _reexec(env)


def reexec_with_deep_stacks() -> None:
  """Re-executes this command with RLIMIT_STACK's soft limit raised to its hard limit
  (usually unlimited), unless it is there already. Call it only at a program's entry."""
  soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
  if soft == hard:
    return
  resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))
  _reexec(os.environ)


def _reexec(env: Mapping[str, str]) -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, dict(env))
