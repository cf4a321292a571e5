"""Pretraining data: corpus readers, NSP instances, masking, array_record shards, grain input.

Kept light: importing `bert_jax.data` loads nothing heavy (no TensorFlow, no grain); the
functions below import their modules on first use.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


def read_instances(path, split: str = "train") -> Iterator[dict[str, np.ndarray]]:
  """Instances written by `bert-jax create-data` (a directory, or one .array_record shard):
  dicts of unpadded int32 arrays `input_ids` (masking applied), `segment_ids`,
  `masked_lm_positions`, `masked_lm_ids`, and the scalar `next_sentence_label`
  (1 = B is a random segment)."""
  from bert_jax.data.records import read_instances as _read
  return _read(path, split)


__all__ = ["read_instances"]
