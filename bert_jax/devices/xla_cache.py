"""A persistent XLA compilation cache for the training commands (pretrain, finetune).

A rerun with the same shapes (another seed or learning rate, a resume after preemption) then
loads its compiled steps instead of compiling them again: on a 2-core CPU one all-MiniLM-L6-v2
fine-tuning step takes about 10 s to compile per length bucket, a BERT-base TPU step minutes.
jax keys each entry by the program, its compile options, the jax/XLA version and the device
kind; the default folder adds a fingerprint of this host's CPU, since XLA CPU code is built
for the host's instruction set and a home folder may be shared by unlike machines.
"""

from __future__ import annotations

import hashlib
import os
import platform

ENV = "BERT_JAX_COMPILATION_CACHE"  # a folder (local or gs://), or "none"
OFF = "none"


def _cpu_fingerprint() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    flags = ""
  return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]


def default_dir() -> str:
  """$BERT_JAX_COMPILATION_CACHE, else ~/.cache/bert-jax/xla/<CPU fingerprint>."""
  if os.environ.get(ENV):
    return os.environ[ENV]
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "bert-jax", "xla", _cpu_fingerprint())


def enable(path: str | None) -> None:
  """Caches every compile over a second in `path` (nothing for "" or "none"), or over
  $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS where that is set (the test suite: 0). Call it
  before the first compile."""
  if not path or path == OFF:
    return
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
