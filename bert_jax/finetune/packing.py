"""Packing for the [CLS] heads: several short sequences laid end to end in one row of
max_seq_length tokens (model.Packed says how the model reads them), so a run computes mostly
real tokens and compiles one shape for training and one for evaluation instead of one per
length bucket.

A train step keeps exactly --batch-size sequences, drawn so that every batch has a like mix of
lengths; its row count, fixed up front, is what the median batch's tokens need, with the few
batches that first-fit decreasing packs into more evened out by trading sequences. An
evaluation batch is as many sequences (longest first, at most --eval-batch-size) as fill its
rows.
"""

from __future__ import annotations

import math

import numpy as np

from bert_jax.finetune.featurize import Features

# A packed batch's [rows, capacity] arrays; sequence_rows/starts and the task's per-sequence
# arrays (labels, weight) have one entry per sequence.
ROW_KEYS = ("input_ids", "token_type_ids", "position_ids", "sequence_ids")


def first_fit(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
  """(row, start column) of each sequence and the rows used: longest first, each into the
  first row with room."""
  rows = np.zeros(len(lengths), np.int32)
  starts = np.zeros(len(lengths), np.int32)
  used: list[int] = []
  for i in np.argsort(-lengths, kind="stable"):
    n = int(lengths[i])
    r = next((r for r, u in enumerate(used) if u + n <= capacity), len(used))
    if r == len(used):
      used.append(0)
    rows[i], starts[i] = r, used[r]
    used[r] += n
  return rows, starts, len(used)


def balanced_batches(lengths: np.ndarray, batch_size: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
  """A shuffled epoch in batches whose length mixes are alike, so that every batch needs about
  the mean rows and the fixed row count (the most any batch needs) wastes little: sorted by
  length (ties in random order), the sequences form strata of one per batch, each stratum
  dealt to the batches in random order. The n % batch_size left over (drawn at random) are a
  shorter batch at a random place; the batches' order is random."""
  order = rng.permutation(len(lengths))
  rest, order = order[:len(order) % batch_size], order[len(order) % batch_size:]
  by_length = order[np.argsort(lengths[order], kind="stable")]
  strata = rng.permuted(by_length.reshape(batch_size, -1), axis=1)  # [batch_size, batches]
  batches = [strata[:, b] for b in rng.permutation(strata.shape[1])]
  if len(rest):
    batches.insert(int(rng.integers(len(batches) + 1)), rest)
  return batches


def fit_rows(epochs: list[list[np.ndarray]], lengths: np.ndarray, capacity: int,
             unit: int) -> tuple[list[list[np.ndarray]], int]:
  """(epochs, rows): the rows every step gets, a multiple of `unit`, and the epochs' batches
  evened out to fit them. The rows are the fewest the median batch's tokens allow; a batch
  that first-fit packs into more trades sequences with batches that have room, within its
  epoch (a few heavy or badly fitting batches would otherwise cost every step a row); failing
  that the rows grow to what the batches need."""
  tokens = [int(lengths[b].sum()) for e in epochs for b in e]
  target = math.ceil(math.ceil(np.median(tokens) / capacity) / unit) * unit
  epochs = [_even_out(list(batches), lengths, capacity, target) for batches in epochs]
  most = max(first_fit(lengths[b], capacity)[2] for e in epochs for b in e)
  return epochs, math.ceil(most / unit) * unit


def _even_out(batches: list[np.ndarray], lengths: np.ndarray, capacity: int,
              target: int) -> list[np.ndarray]:
  """Swaps a long sequence of each batch that needs more than `target` rows for a shorter one
  of the lightest batches, as long as both then fit `target` rows."""
  rows = lambda idx: first_fit(lengths[idx], capacity)[2]  # noqa: E731
  for a in range(len(batches)):
    if rows(batches[a]) <= target:
      continue
    heavy = batches[a]
    lightest = np.argsort([lengths[b].sum() for b in batches])[:10]
    trades = ((i, b, k) for i in np.argsort(-lengths[heavy])[:4] for b in lightest if b != a
              for k in np.argsort(lengths[batches[b]]))
    for i, b, k in trades:
      light = batches[b]
      if lengths[light[k]] >= lengths[heavy[i]]:
        continue
      new_heavy, new_light = heavy.copy(), light.copy()
      new_heavy[i], new_light[k] = light[k], heavy[i]
      if rows(new_heavy) <= target and rows(new_light) <= target:
        batches[a], batches[b] = new_heavy, new_light
        break
  return batches


def eval_packs(lengths: np.ndarray, capacity: int, rows: int,
               max_sequences: int) -> list[np.ndarray]:
  """Sequences longest first, each into the first row with room; a batch closes when no row
  has room (and all `rows` are open) or when it holds `max_sequences`."""
  packs, current = [], []
  free = np.full(rows, capacity)
  opened = 0
  for i in np.argsort(-lengths, kind="stable"):
    n = int(lengths[i])
    fits = np.flatnonzero(free[:opened] >= n)
    if not len(fits) and opened == rows or len(current) == max_sequences:
      packs.append(np.asarray(current))
      current, opened = [], 0
      free[:] = capacity
      fits = fits[:0]
    r = fits[0] if len(fits) else opened
    opened = max(opened, r + 1)
    free[r] -= n
    current.append(i)
  if current:
    packs.append(np.asarray(current))
  return packs


def packed_batch(feats: Features, idx: np.ndarray, sequences: int, rows: int,
                 keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Sequences `idx` packed into `rows` rows of feats' length (first-fit decreasing); the
  per-sequence arrays among `keys` (labels, ...) padded to `sequences` (weight 0)."""
  capacity = feats.arrays["input_ids"].shape[-1]
  lengths = feats.lengths[idx]
  row_of, start_of, used = first_fit(lengths, capacity)
  if used > rows:
    raise ValueError(f"{len(idx)} sequences need {used} rows, the batch has {rows}")
  batch = {k: np.zeros((rows, capacity), np.int32) for k in ROW_KEYS}
  for j, (i, r, s, n) in enumerate(zip(idx, row_of, start_of, lengths)):
    batch["input_ids"][r, s:s + n] = feats.arrays["input_ids"][i, :n]
    batch["token_type_ids"][r, s:s + n] = feats.arrays["token_type_ids"][i, :n]
    batch["position_ids"][r, s:s + n] = np.arange(n)
    batch["sequence_ids"][r, s:s + n] = j + 1
  pad = sequences - len(idx)
  batch["sequence_rows"] = np.pad(row_of, (0, pad))
  batch["sequence_starts"] = np.pad(start_of, (0, pad))
  for k in keys:
    if k not in feats.seq_keys:
      x = feats.arrays[k][idx]
      batch[k] = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
  batch["weight"] = (np.arange(sequences) < len(idx)).astype(np.float32)
  return batch
