"""Batches of fine-tuning features without packing (packing.py packs the [CLS] heads' rows):
rows padded only to the smallest length bucket (16, 32, 64, ... up to max_seq_length) that
holds the batch's longest, so jit compiles a handful of shapes; training rows of similar length
grouped (sorted within shuffled windows of 50 batches). A train step's micro-batches are
joined into its rows by bert_jax.data.batch.join_micro, the inverse of the step's split.
"""

from __future__ import annotations

import numpy as np

from bert_jax.data.batch import IGNORE
from bert_jax.finetune.featurize import Features

SORT_WINDOW_BATCHES = 50


def make_buckets(max_len: int, smallest: int = 16) -> list[int]:
  buckets, b = [], smallest
  while b < max_len:
    buckets.append(b)
    b *= 2
  return buckets + [max_len]


def bucket_for(length: int, buckets: list[int]) -> int:
  return next(b for b in buckets if b >= length)


def train_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                  sort_window: int = SORT_WINDOW_BATCHES) -> list[np.ndarray]:
  """Shuffled rows, sorted by length inside windows of `sort_window` batches, cut into
  batches whose order is shuffled again: similar lengths share a batch, epochs still differ."""
  order = rng.permutation(len(lengths))
  window = batch_size * sort_window
  batches = []
  for start in range(0, len(order), window):
    chunk = order[start:start + window]
    chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
  return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
  order = np.argsort(lengths, kind="stable")
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def make_batch(feats: Features, idx: np.ndarray, batch_size: int, buckets: list[int],
               keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Rows `idx` padded to `batch_size` rows (weight 0) and cut to their bucket length."""
  length = bucket_for(int(feats.lengths[idx].max()), buckets)
  pad = batch_size - len(idx)
  batch = {}
  for k in keys:
    x = feats.arrays[k][idx]
    if k in feats.seq_keys:
      x = x[..., :length]
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    batch[k] = x
  if pad and "labels" in feats.seq_keys and "labels" in keys:
    batch["labels"][len(idx):] = IGNORE
  batch["weight"] = (np.arange(batch_size) < len(idx)).astype(np.float32)
  return batch
