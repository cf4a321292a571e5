"""The pretraining input pipeline: create-data shards -> fixed-shape batches, a whole batch at a
time.

Each process reads its own share of the records in grain's IndexSampler order (an even split
over the processes, each share shuffled afresh every epoch). Batch b of a process is records
b*B ... (b+1)*B - 1 of that epoch-spanning stream, built in a few numpy passes: the keys of the
batch, one array_record read, `records.decode_batch` (decode + pad), and for data created with
--no-static-masking `masking.mask_tokens` over the [B, L] batch with a generator seeded by
(seed, process, position of the batch's first record), so masks are fresh each epoch and a
restored iterator reproduces them. Batches are random access, so grain worker processes can
each build every W-th batch, and the stream is the same whatever the number of workers.

The iterator's state is the number of records this process consumed (a small JSON dict, what
orbax saves beside the model): `set_state` resumes at the next batch bit for bit, with or
without workers, and the states of the per-record grain DataLoader this replaced resume too.
"""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np

from bert_jax.data import masking, records
from bert_jax.errors import UserError

STATE_FORMAT = "bert-jax-batches"
_MASK_STREAM = 0x6D61736B   # keeps the masking generator apart from other uses of the seed
# The one-line hint of a grain worker that died (killed, out of memory).
_DEAD_WORKER = "Worker process was terminated unexpectedly"
_SPECIAL_IDS = ("cls_id", "sep_id")   # in BatchSource.mask beside mask_tokens' arguments


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


def default_worker_count(cores: int | None = None) -> int:
  """Worker processes for `data.worker_count=-1`: none below 8 cores for this process (one
  process builds 15,000+ sequences/s at seq 128, and a small host needs its other cores for
  the training process), else one per 8 cores up to 8 (a v6e or H100 host consumes ~55,000
  sequences/s at seq 128)."""
  cores = _cores_for_this_process() if cores is None else cores
  return 0 if cores < 8 else min(8, cores // 8)


def _cores_for_this_process() -> int:
  """The cores this process may use: its CPU affinity when that is a subset of the host
  (e.g. srun --cpus-per-task), else the host's cores over the processes launched on it."""
  total = os.cpu_count() or 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
  if cores < total:
    return cores
  for name in ("SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
    local = re.match(r"\d+", os.environ.get(name, ""))
    if local and int(local[0]) > 0:
      return max(1, cores // int(local[0]))
  return cores


class RecordOrder:
  """Record keys of positions in this process's epoch-spanning stream, in grain IndexSampler's
  order (ShardOptions with drop_remainder: process p of n reads records [p*m, (p+1)*m) with
  m = records // n; each epoch e permutes them with index_shuffle(seed + e))."""

  def __init__(self, num_records: int, shard_index: int, shard_count: int, shuffle: bool,
               seed: int):
    self.length = num_records // shard_count
    self.start = self.length * shard_index
    self.shuffle, self.seed = shuffle, seed

  def keys(self, positions_K: np.ndarray) -> np.ndarray:
    epoch_K, index_K = np.divmod(positions_K, self.length)
    if self.shuffle:
      from grain.experimental import index_shuffle
      top = self.length - 1
      index_K = np.array([index_shuffle(i, max_index=top, seed=(self.seed + e) % 2**32, rounds=4)
                          for i, e in zip(index_K.tolist(), epoch_K.tolist())], np.int64)
    return self.start + index_K


class BatchSource:
  """Random access to batches: batch b holds stream positions start + b*B ... (fewer in a last
  partial batch when drop_remainder is False). Picklable, for grain workers."""

  def __init__(self, reader: records.ShardReader, order: RecordOrder, *, start: int,
               total: int | None, batch_size: int, seq_len: int, max_predictions: int,
               pad_id: int, drop_remainder: bool, mask: dict | None, seed: int,
               shard_index: int):
    self.reader, self.order, self.start, self.total = reader, order, start, total
    self.batch_size, self.seq_len, self.max_predictions = batch_size, seq_len, max_predictions
    self.pad_id, self.mask, self.seed, self.shard_index = pad_id, mask, seed, shard_index
    if total is None:
      self.length = sys.maxsize
    else:
      left = max(total - start, 0)
      self.length = left // batch_size if drop_remainder else -(-left // batch_size)

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, b: int) -> dict:
    first = self.start + int(b) * self.batch_size
    count = self.batch_size if self.total is None else min(self.batch_size, self.total - first)
    keys_B = self.order.keys(np.arange(first, first + count, dtype=np.int64))
    batch, len_a_B, continuation_BL = records.decode_batch(
        self.reader.read(keys_B), self.seq_len, self.max_predictions, self.pad_id)
    if self.mask is not None:
      self._mask(batch, len_a_B, continuation_BL, first)
    return batch

  def _mask(self, batch: dict, len_a_B, continuation_BL, first: int) -> None:
    """Dynamic masking of the whole batch; never [CLS], the two [SEP]s or padding, nor any
    [CLS]/[SEP] of a single-segment row (the [SEP]s between its documents)."""
    ids_BL, tokens_BL = batch["input_ids"], batch["attention_mask"] != 0
    cols_L = np.arange(ids_BL.shape[1])
    length_B = tokens_BL.sum(1)
    special_BL = ((cols_L == 0)[None, :] | (cols_L[None, :] == len_a_B[:, None] + 1)
                  | (cols_L[None, :] == length_B[:, None] - 1))
    single_B = len_a_B + 2 == length_B      # a pair row is at least len_a + 3 long
    if single_B.any():
      mask = self.mask
      special_BL |= single_B[:, None] & ((ids_BL == mask["cls_id"]) | (ids_BL == mask["sep_id"]))
    rng = np.random.default_rng([_MASK_STREAM, self.seed, self.shard_index, first])
    m = masking.mask_tokens(rng, ids_BL, tokens_BL & ~special_BL, continuation_BL,
                            max_predictions=self.max_predictions,
                            **{k: v for k, v in self.mask.items() if k not in _SPECIAL_IDS})
    batch.update(m.batch_fields())


class BatchIterator:
  """Iterator of one process's batches with get_state()/set_state(); `worker_count` grain
  worker processes (0: in this process) each build every W-th batch, `buffer` ahead each."""

  def __init__(self, source_args: dict, *, shard_count: int, worker_count: int, buffer: int):
    self.source_args, self.worker_count, self.buffer = source_args, worker_count, buffer
    self.position = 0          # stream position of the next record this iterator returns
    self._it = None
    order = source_args["order"]
    # What a saved state must match to resume this stream exactly.
    self._identity = dict(num_records=len(source_args["reader"]), seed=order.seed,
                          shuffle=order.shuffle, shard_index=source_args["shard_index"],
                          shard_count=shard_count)

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = self._start()
    try:
      batch = next(self._it)
    except StopIteration:
      raise
    except Exception as e:
      self.close()             # a later next() starts afresh at `position`, not at the end
      if not (isinstance(e, RuntimeError) and _DEAD_WORKER in str(e)):
        raise
      code = re.search(r"exit code (-?\d+)", str(e))
      raise UserError(f"input pipeline: a grain worker process died (exit code "
                      f"{code[1] if code else '?'}; negative: killed by that signal); rerun "
                      "to resume from the last checkpoint, with fewer workers "
                      "(--config.data.worker_count) if it ran out of memory") from None
    self.position += len(batch["next_sentence_label"])
    return batch

  def _start(self):
    source = BatchSource(start=self.position, **self.source_args)
    if not self.worker_count:
      return (source[b] for b in range(len(source)))
    import grain.python as grain
    _absl_flags_ready()
    ds = grain.MapDataset.source(source).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count,
                                                     per_worker_buffer_size=self.buffer),
                        worker_init_fn=_exit_with_parent)
    return iter(ds)

  def get_state(self) -> dict:
    return dict(format=STATE_FORMAT, version=1, next_record=self.position, **self._identity)

  def set_state(self, state) -> None:
    """A state of get_state() (or JSON of it), or of the grain DataLoader iterator earlier
    bert-jax versions checkpointed (worker_count 0: the same record stream)."""
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if "last_seen_indices" in state:
      if state.get("worker_count") != 0:
        raise UserError("data-iterator state: from grain's DataLoader with "
                        f"{state.get('worker_count')} workers, whose order this pipeline "
                        "does not reproduce; resume with the bert-jax version that wrote it")
      p, n = self._identity["shard_index"], self._identity["shard_count"]
      position = (int(state["last_seen_indices"]["0"]) - p) // n + 1
    else:
      if state.get("format") != STATE_FORMAT:
        raise UserError(f"data-iterator state: field 'format' is {state.get('format')!r}; "
                        f"expected {STATE_FORMAT!r}")
      differ = [f"{k} {state.get(k)!r} (now {v!r})" for k, v in self._identity.items()
                if state.get(k) != v]
      if differ:
        raise UserError(f"data-iterator state: saved for another input ({', '.join(differ)}); "
                        "resume with the same data, seed and number of processes")
      position = int(state["next_record"])
    self.close()
    self.position = position

  def close(self) -> None:
    """Stops the worker processes (a later next() starts them again)."""
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """grain worker_init_fn: a worker whose training process was killed (SIGKILL leaves it no
  chance to stop its workers) exits too, instead of running on, orphaned."""
  del worker_index, worker_count
  import threading
  import time
  parent = os.getppid()

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(1)

  threading.Thread(target=watch, name="bert-jax-parent-watch", daemon=True).start()


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
                  prefetch: int = 0, place=None, drop_remainder: bool = True,
                  man: dict | None = None):
  """An iterator of per-process batches: dicts of numpy arrays, the fields of
  `bert_jax.data.batch.PRETRAINING` (transformers' names), T = seq_len, P = max_predictions.

  Data created with --no-static-masking is masked here, afresh each epoch, whatever
  `dynamic_masking` says; asking for dynamic masking of statically masked data is an error.
  `process_index`/`process_count` default to jax.process_index()/process_count().
  `worker_count`: grain worker processes (-1: `default_worker_count()`); `prefetch` > 0 builds
  that many batches ahead in a background thread, which also applies `place` (e.g. the copy
  to the devices), so the training loop receives `place(batch)`. `man`: the directory's
  manifest, when the caller has read and checked it already (each read is a round trip on
  gs://).
  """
  data_dir = os.fspath(data_dir)
  if man is None:  # a caller that read the manifest has checked it (workdir.read_manifests)
    man = records.read_manifest(data_dir)
    check_fits(man, seq_len, max_predictions, where=f"data directory {data_dir}")
  if batch_size < 1:
    raise UserError(f"batch_size {batch_size}: expected at least 1")
  if worker_count < -1 or prefetch < 0:
    raise UserError(f"data.worker_count {worker_count} / data.prefetch {prefetch}: expected "
                    "worker_count -1 (chosen from the cores) or >= 0, prefetch >= 0")
  if not 0 <= int(seed) < 2**32:
    raise UserError(f"seed {seed}: expected an integer in [0, 2**32)")
  stored_unmasked = not man["static_masking"]
  if dynamic_masking and not stored_unmasked:
    raise UserError(f"data directory {data_dir}: its instances are already masked (created "
                    "without --no-static-masking), so they cannot be masked dynamically")
  if (process_index is None) != (process_count is None):
    raise UserError("process_index and process_count: give both or neither")
  if process_index is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  reader = records.ShardReader(records.shard_paths(data_dir, split, man))
  if len(reader) < process_count:
    raise UserError(f"data directory {data_dir}: split {split!r} has {len(reader)} "
                    f"instances, fewer than the {process_count} processes")
  order = RecordOrder(len(reader), process_index, process_count, shuffle, int(seed))
  vocab = man["vocab"]
  mask = None
  if stored_unmasked:
    mask = dict(masked_lm_prob=masked_lm_prob, mask_id=vocab["mask_id"],
                cls_id=vocab["cls_id"], sep_id=vocab["sep_id"],
                random_pool=masking.random_token_pool(vocab["size"], [vocab[k] for k in (
                    "pad_id", "unk_id", "cls_id", "sep_id", "mask_id")]))
  source_args = dict(
      reader=reader, order=order, total=None if num_epochs is None else num_epochs * order.length,
      batch_size=batch_size, seq_len=seq_len, max_predictions=max_predictions,
      pad_id=vocab["pad_id"], drop_remainder=drop_remainder, mask=mask, seed=int(seed),
      shard_index=process_index)
  workers = default_worker_count() if worker_count == -1 else worker_count
  it = BatchIterator(source_args, shard_count=process_count, worker_count=workers,
                     buffer=max(prefetch, 1))
  if prefetch == 0 and place is None:
    return it
  from bert_jax.data.prefetch import Prefetcher
  return Prefetcher(it, depth=prefetch, place=place)
