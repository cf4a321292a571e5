"""The pretraining input pipeline on grain: create-data shards -> fixed-shape batches.

array_record source -> index sampler (global shuffle per epoch, sharded by process) ->
decode -> [dynamic masking] -> pad -> batch. The iterator is grain's DataLoaderIterator: its
`get_state()` / `set_state()` (also what orbax saves beside the model) resume exactly at the
next batch. Dynamic masking is a grain random map: grain derives each record's generator
from the seed and the record's position in the epoch-spanning stream, so every epoch gets
fresh masks and a restored iterator reproduces them.
"""

from __future__ import annotations

import os

import grain.python as grain
import numpy as np

from bert_jax.data import masking, records
from bert_jax.errors import UserError


def manifest(data_dir: str | os.PathLike) -> dict:
  """manifest.json of a create-data directory, validated (UserError names the path)."""
  return records.read_manifest(data_dir)


def check_fits(man: dict, seq_len: int, max_predictions: int, where: str = "data") -> None:
  """UserError unless the data's instances fit a phase of `seq_len` / `max_predictions`."""
  if man["max_seq_length"] > seq_len:
    raise UserError(f"{where}: instances were created with --max-seq-length "
                    f"{man['max_seq_length']}, longer than this phase's seq_len {seq_len}; "
                    f"run create-data with --max-seq-length {seq_len}")
  if man["static_masking"] and man["max_predictions_per_seq"] > max_predictions:
    raise UserError(f"{where}: instances hold up to {man['max_predictions_per_seq']} masked "
                    f"positions (--max-predictions-per-seq), more than this phase's "
                    f"max_predictions {max_predictions}")


class Decode(grain.MapTransform):
  """Record bytes -> dict of unpadded arrays."""

  def map(self, data: bytes) -> dict:
    return records.decode_record(data)


class DynamicMask(grain.RandomMapTransform):
  """Fresh masks per record visit (the rng comes from grain: seed + stream position)."""

  def __init__(self, *, masked_lm_prob: float, max_predictions: int, mask_id: int,
               pool: np.ndarray):
    self.masked_lm_prob, self.max_predictions = masked_lm_prob, max_predictions
    self.mask_id, self.pool = mask_id, pool

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    ids_1L = element["input_ids"][None, :]
    L = ids_1L.shape[1]
    maskable_1L = np.ones((1, L), bool)
    len_a = int(np.argmax(element["segment_ids"])) - 2
    maskable_1L[0, [0, len_a + 1, L - 1]] = False
    cont = element.get("continuation")
    m = masking.mask_tokens(rng, ids_1L, maskable_1L, None if cont is None else cont[None, :],
                            masked_lm_prob=self.masked_lm_prob,
                            max_predictions=self.max_predictions, mask_id=self.mask_id,
                            random_pool=self.pool)
    count = int(m.counts[0])
    return dict(input_ids=m.input_ids[0], segment_ids=element["segment_ids"],
                masked_lm_positions=m.positions[0, :count], masked_lm_ids=m.labels[0, :count],
                next_sentence_label=element["next_sentence_label"])


class Pad(grain.MapTransform):
  """Unpadded instance -> fixed shapes [L] and [P] (+ input_mask and masked_lm_weights)."""

  def __init__(self, seq_len: int, max_predictions: int, pad_id: int):
    self.seq_len, self.max_predictions, self.pad_id = seq_len, max_predictions, pad_id

  def map(self, element: dict) -> dict:
    n, k = len(element["input_ids"]), len(element["masked_lm_positions"])
    input_ids = np.full(self.seq_len, self.pad_id, np.int32)
    input_ids[:n] = element["input_ids"]
    input_mask = np.zeros(self.seq_len, np.int32)
    input_mask[:n] = 1
    segment_ids = np.zeros(self.seq_len, np.int32)
    segment_ids[:n] = element["segment_ids"]
    positions = np.zeros(self.max_predictions, np.int32)
    positions[:k] = element["masked_lm_positions"]
    labels = np.zeros(self.max_predictions, np.int32)
    labels[:k] = element["masked_lm_ids"]
    weights = np.zeros(self.max_predictions, np.float32)
    weights[:k] = 1.0
    return dict(input_ids=input_ids, input_mask=input_mask, segment_ids=segment_ids,
                masked_lm_positions=positions, masked_lm_ids=labels, masked_lm_weights=weights,
                next_sentence_labels=np.int32(element["next_sentence_label"]))


def _absl_flags_ready() -> None:
  """grain's worker processes read absl flags; outside absl.app nobody parsed them."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_iterator(data_dir, *, split: str = "train", batch_size: int, seq_len: int,
                  max_predictions: int, seed: int, shuffle: bool = True,
                  num_epochs: int | None = None, dynamic_masking: bool = False,
                  masked_lm_prob: float = 0.15, process_index: int | None = None,
                  process_count: int | None = None, worker_count: int = 0,
                  drop_remainder: bool = True):
  """A grain DataLoader iterator of per-process batches (dicts of fixed-shape numpy arrays):
  input_ids, input_mask, segment_ids [B, seq_len] int32; masked_lm_positions, masked_lm_ids
  [B, P] int32 and masked_lm_weights [B, P] float32; next_sentence_labels [B] int32.

  Data created with --no-static-masking is masked here, afresh each epoch, whatever
  `dynamic_masking` says; asking for dynamic masking of statically masked data is an error.
  `process_index`/`process_count` default to jax.process_index()/process_count().
  """
  data_dir = os.fspath(data_dir)
  man = manifest(data_dir)
  check_fits(man, seq_len, max_predictions, where=f"data directory {data_dir}")
  if batch_size < 1:
    raise UserError(f"batch_size {batch_size}: expected at least 1")
  stored_unmasked = not man["static_masking"]
  if dynamic_masking and not stored_unmasked:
    raise UserError(f"data directory {data_dir}: its instances are already masked (created "
                    "without --no-static-masking), so they cannot be masked dynamically")
  source = grain.ArrayRecordDataSource(records.shard_paths(data_dir, split))
  if (process_index is None) != (process_count is None):
    raise UserError("process_index and process_count: give both or neither")
  if process_index is None:
    shard_options = grain.ShardByJaxProcess(drop_remainder=True)
  else:
    shard_options = grain.ShardOptions(process_index, process_count, drop_remainder=True)
  sampler = grain.IndexSampler(num_records=len(source), shard_options=shard_options,
                               shuffle=shuffle, num_epochs=num_epochs, seed=int(seed))
  operations = [Decode()]
  if stored_unmasked:
    vocab = man["vocab"]
    pool = masking.random_token_pool(vocab["size"], [vocab[k] for k in (
        "pad_id", "unk_id", "cls_id", "sep_id", "mask_id")])
    operations.append(DynamicMask(masked_lm_prob=masked_lm_prob, max_predictions=max_predictions,
                                  mask_id=vocab["mask_id"], pool=pool))
  operations += [Pad(seq_len, max_predictions, man["vocab"]["pad_id"]),
                 grain.Batch(batch_size, drop_remainder=drop_remainder)]
  if worker_count:
    _absl_flags_ready()
  loader = grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=worker_count)
  return iter(loader)
