"""The batch schema, written once: the names, dtypes and shapes of a pretraining batch and of
the fields every fine-tuning batch shares, and the one rule that lays a train step's
micro-batches out in its rows (`join_micro`) and takes them apart again (`split_micro`).

A field's dims are letters: B rows, T tokens, P prediction slots (pretraining), C choices.
One name per field from the record to the loss: create-data's records decode
(`records.decode_batch`), the input pipeline masks (`masking.Masked.batch_fields`), the train
step lowers (`abstract_batch`) and the loss reads these names. Only `records.read_instances`,
a documented contract, says `segment_ids` for token_type_ids.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # jax is imported where it is used: records.py (create-data) stays light
  import jax


@dataclasses.dataclass(frozen=True)
class Field:
  name: str
  dtype: type
  dims: tuple[str, ...]
  fill: int = 0           # the value of padding (rows, tokens or slots past the real ones)


PRETRAINING = (
    Field("input_ids", np.int32, ("B", "T")),          # [CLS] A [SEP] B [SEP], masking applied
    Field("attention_mask", np.int32, ("B", "T")),     # 1 on the real tokens
    Field("token_type_ids", np.int32, ("B", "T")),     # 0 for [CLS] A [SEP], 1 for B [SEP]
    Field("masked_lm_positions", np.int32, ("B", "P")),
    Field("masked_lm_ids", np.int32, ("B", "P")),      # the original ids at those positions
    Field("masked_lm_weights", np.float32, ("B", "P")),  # 1 on the real predictions
    Field("next_sentence_label", np.int32, ("B",)),    # 1: B is a random next segment
)
PRETRAINING_NAMES = tuple(f.name for f in PRETRAINING)  # the order of the pipeline's dicts

# The fields every fine-tuning task's batch holds. labels are [B] int32 for classification
# and multiple choice (float32 for regression), [B, T] for token tagging, where padding is
# IGNORE (transformers' -100, featurize.IGNORE) so it does not count in the loss. Multiple
# choice adds a C axis before T. Task extras: choice_mask [B, C]; span QA's start_positions
# and end_positions [B]; a packed batch's position_ids and sequence_ids [B, T] (B its rows)
# and sequence_rows and sequence_starts [S] (one per sequence, as labels and weight).
IGNORE = -100
FINETUNING = (
    Field("input_ids", np.int32, ("B", "T")),
    Field("token_type_ids", np.int32, ("B", "T")),
    Field("attention_mask", np.int32, ("B", "T")),
    Field("labels", np.int32, ("B",), fill=IGNORE),
    Field("weight", np.float32, ("B",)),               # 1 for a real row, 0 for padding
)
FINETUNING_FILL = {f.name: f.fill for f in FINETUNING}


def shapes(fields: Sequence[Field], **sizes: int) -> dict[str, tuple[int, ...]]:
  """Each field's shape for the sizes of its dims, e.g. shapes(PRETRAINING, B=8, T=128, P=20)."""
  return {f.name: tuple(sizes[d] for d in f.dims) for f in fields}


def pretraining_sizes(batch_size: int, seq_len: int, max_predictions: int) -> dict[str, int]:
  return dict(B=batch_size, T=seq_len, P=max_predictions)


def pretraining_batch(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A host pretraining batch in the schema's order and dtypes (no copy where the dtype is
  already right); ValueError naming the fields when they are not exactly the schema's."""
  if set(arrays) != set(PRETRAINING_NAMES):
    raise ValueError(f"a pretraining batch holds {', '.join(PRETRAINING_NAMES)}; got "
                     f"{', '.join(sorted(arrays))}")
  return {f.name: np.asarray(arrays[f.name]).astype(f.dtype, copy=False) for f in PRETRAINING}


def abstract_batch(sharding, batch_size: int, seq_len: int,
                   max_predictions: int) -> dict[str, jax.ShapeDtypeStruct]:
  """A global pretraining batch as ShapeDtypeStructs placed by `sharding` (the real one's,
  `training.sharding.batch_sharding(mesh)`): what the train step is lowered with."""
  import jax
  sizes = pretraining_sizes(batch_size, seq_len, max_predictions)
  return {f.name: jax.ShapeDtypeStruct(shape, f.dtype, sharding=sharding)
          for f, shape in zip(PRETRAINING, shapes(PRETRAINING, **sizes).values())}


def prediction_weights(counts_B: np.ndarray, max_predictions: int) -> np.ndarray:
  """masked_lm_weights [B, P] float32: 1 in the first counts_B[b] slots of row b."""
  return (np.arange(max_predictions)[None, :] < counts_B[:, None]).astype(np.float32)


# ----------------------------------------------------------------------------- micro-batches

def join_micro(micros: Sequence[Mapping[str, np.ndarray]], seq_keys: Sequence[str],
               fill: Mapping[str, int] = FINETUNING_FILL) -> dict[str, np.ndarray]:
  """One train step's rows from its A micro-batches of B/A rows: the arrays of `seq_keys`
  padded on their last (token) axis to the longest micro-batch's with fill[k] (default 0),
  then interleaved so that micro-batch i is rows i, i+A, ...: `split_micro`'s inverse."""
  length = max(m["input_ids"].shape[-1] for m in micros)
  out = {}
  for k in micros[0]:
    parts = [pad_last(m[k], length, fill.get(k, 0)) if k in seq_keys else m[k]
             for m in micros]
    stacked = np.stack(parts, axis=1)  # [B/A, A, ...]
    out[k] = stacked.reshape((-1,) + stacked.shape[2:])
  return out


def split_micro(x, grad_accum: int):
  """[B, ...] -> [A, B/A, ...] with micro-batch i = rows i, i+A, ... (numpy or jax arrays):
  each device keeps its own contiguous rows and holds a slice of every micro-batch, so the
  accumulation scan reshards nothing (the step constrains the result to that layout)."""
  x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])
  return x.swapaxes(0, 1)


def pad_last(x: np.ndarray, length: int, fill: float) -> np.ndarray:
  """`x` padded with `fill` on its last axis to `length`."""
  return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])], constant_values=fill)
