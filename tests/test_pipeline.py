"""The input pipeline: fixed shapes, contents (the same as the per-record grain DataLoader it
replaced), sharding, exact resume with and without workers, dynamic masking statistics on real
text, the prefetch thread and a dying worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bert_jax.data import create, pipeline, read_instances, records
from bert_jax.data.prefetch import Prefetcher
from bert_jax.errors import UserError

SEQ, PRED = 64, 10


@pytest.fixture(scope="module")
def vocab(minilm_dir):
  return str(minilm_dir / "vocab.txt")


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory, vocab):
  out = tmp_path_factory.mktemp("pipe") / "static"
  create.create_data(["sample"], vocab, out, max_seq_length=SEQ, max_predictions_per_seq=PRED,
                     dupe_factor=1, workers=1, progress=False)
  return out


@pytest.fixture(scope="module")
def dynamic_dir(tmp_path_factory, vocab):
  out = tmp_path_factory.mktemp("pipe") / "dynamic"
  create.create_data(["sample"], vocab, out, max_seq_length=SEQ, max_predictions_per_seq=PRED,
                     dupe_factor=1, workers=1, progress=False, static_masking=False,
                     whole_word_mask=True)
  return out


def _iter(data_dir, **kw):
  args = dict(batch_size=8, seq_len=SEQ, max_predictions=PRED, seed=0, process_index=0,
              process_count=1)
  args.update(kw)
  return pipeline.make_iterator(data_dir, **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_shapes_and_contents_match_the_records(static_dir):
  insts = list(read_instances(static_dir))
  it = _iter(static_dir, shuffle=False, num_epochs=1)
  batch = next(it)
  shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
  assert shapes == {
      "input_ids": ((8, SEQ), np.int32), "attention_mask": ((8, SEQ), np.int32),
      "token_type_ids": ((8, SEQ), np.int32), "masked_lm_positions": ((8, PRED), np.int32),
      "masked_lm_ids": ((8, PRED), np.int32), "masked_lm_weights": ((8, PRED), np.float32),
      "next_sentence_label": ((8,), np.int32)}
  for row, inst in enumerate(insts[:8]):
    n, k = len(inst["input_ids"]), len(inst["masked_lm_ids"])
    np.testing.assert_array_equal(batch["input_ids"][row, :n], inst["input_ids"])
    assert not batch["input_ids"][row, n:].any() and batch["attention_mask"][row].sum() == n
    np.testing.assert_array_equal(batch["token_type_ids"][row, :n], inst["segment_ids"])
    np.testing.assert_array_equal(batch["masked_lm_positions"][row, :k], inst["masked_lm_positions"])
    np.testing.assert_array_equal(batch["masked_lm_ids"][row, :k], inst["masked_lm_ids"])
    assert batch["masked_lm_weights"][row].tolist() == [1.0] * k + [0.0] * (PRED - k)
    assert batch["next_sentence_label"][row] == inst["next_sentence_label"]


def test_one_epoch_visits_every_record_once_and_shuffle_differs(static_dir):
  num = len(list(read_instances(static_dir)))
  seen = np.concatenate([b["input_ids"] for b in _iter(static_dir, num_epochs=1, batch_size=1)])
  assert len(seen) == num and len({r.tobytes() for r in seen}) == len(seen)
  plain = next(_iter(static_dir, shuffle=False))["input_ids"]
  shuffled = next(_iter(static_dir, shuffle=True))["input_ids"]
  assert not np.array_equal(plain, shuffled)


def test_process_sharding_splits_the_records(static_dir):
  rows = []
  for index in range(2):
    it = _iter(static_dir, num_epochs=1, batch_size=1, process_index=index, process_count=2)
    rows.append({b["input_ids"].tobytes() for b in it})
  total = len(list(read_instances(static_dir)))
  assert not rows[0] & rows[1] and len(rows[0]) + len(rows[1]) == total - total % 2


@pytest.mark.parametrize("where", ["mid-epoch", "epoch boundary"])
def test_state_round_trip_gives_the_next_batches(static_dir, where):
  # 8 records a batch: from the epoch's last batch, the next ones cross into epoch 2.
  count = records.read_manifest(static_dir)["splits"]["train"]["num_instances"]
  skip = 3 if where == "mid-epoch" else count // 8 - 1
  it = _iter(static_dir)
  _take(it, skip)
  state = it.get_state()
  expected = _take(it, 4)
  fresh = _iter(static_dir)
  fresh.set_state(state)
  _assert_same(_take(fresh, 4), expected)


def test_dynamic_masking_fresh_per_epoch_reproducible_and_resumable(dynamic_dir, vocab):
  man = records.read_manifest(dynamic_dir)
  assert man["static_masking"] is False and man["whole_word_mask"] is True
  count = man["splits"]["train"]["num_instances"]
  epoch = count // 8
  it = _iter(dynamic_dir, shuffle=False)
  first, second = _take(it, epoch), _take(it, 3)
  # Records 0-7 again in epoch 2 (rows `count`..+7 of the stream), new masks, the same text.
  def stream(batches, key):
    return np.concatenate([b[key] for b in batches])

  def restored(batches):
    ids = stream(batches, "input_ids").copy()
    positions, labels = stream(batches, "masked_lm_positions"), stream(batches, "masked_lm_ids")
    for row, k in enumerate(stream(batches, "masked_lm_weights").sum(-1).astype(int)):
      ids[row, positions[row, :k]] = labels[row, :k]
    return ids

  again = slice(count, count + 8)
  assert not np.array_equal(stream(first, "masked_lm_positions")[:8],
                            stream(first + second, "masked_lm_positions")[again])
  np.testing.assert_array_equal(restored(first)[:8], restored(first + second)[again])
  masked_fraction = np.mean([b["masked_lm_weights"].sum() / (b["attention_mask"].sum() - 3 * 8)
                             for b in first])
  assert 0.12 < masked_fraction < 0.17
  assert (np.concatenate([b["input_ids"] for b in first]) == man["vocab"]["mask_id"]).any()
  # The same seed reproduces the masks; state round trip across the epoch boundary too.
  _assert_same(_take(_iter(dynamic_dir, shuffle=False), 3), first[:3])
  it = _iter(dynamic_dir)
  _take(it, epoch - 1)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = _iter(dynamic_dir)
  fresh.set_state(state)
  _assert_same(_take(fresh, 3), expected)


def test_manifest_and_fit_errors(tmp_path, static_dir):
  with pytest.raises(UserError, match="not found"):
    records.read_manifest(tmp_path / "nope")
  (tmp_path / "partial").mkdir()
  (tmp_path / "partial" / "train-00000.array_record.tmp").write_bytes(b"")
  with pytest.raises(UserError, match="partial.*incomplete"):
    records.read_manifest(tmp_path / "partial")
  with pytest.raises(UserError, match="max-seq-length 64.*seq_len 32"):
    _iter(static_dir, seq_len=32)
  with pytest.raises(UserError, match="max_predictions 5"):
    _iter(static_dir, max_predictions=5)
  with pytest.raises(UserError, match="already masked"):
    _iter(static_dir, dynamic_masking=True)
  with pytest.raises(UserError, match="no split 'eval'"):
    _iter(static_dir, split="eval")
  # Longer phases take shorter data (padding), e.g. 128-token data in a 512 phase.
  assert next(_iter(static_dir, seq_len=128, max_predictions=20))["input_ids"].shape == (8, 128)


def test_dynamic_token_masking_budget(tmp_path, vocab):
  out = tmp_path / "plain"
  create.create_data(["sample"], vocab, out, max_seq_length=SEQ, dupe_factor=1, workers=1,
                     progress=False, static_masking=False)
  assert "continuation" not in next(read_instances(out))
  for batch in _take(_iter(out, shuffle=False), 5):
    maskable = batch["attention_mask"].sum(1) - 3
    expected = np.clip(np.floor(maskable * 0.15 + 0.5), 1, PRED)
    np.testing.assert_array_equal(batch["masked_lm_weights"].sum(1), expected)
    labels = batch["masked_lm_ids"][batch["masked_lm_weights"] > 0]
    assert not np.isin(labels, [0, 101, 102]).any()     # never [PAD]/[CLS]/[SEP]


# -- against the per-record grain DataLoader this pipeline replaced ----------------------------

def _old_loader(data_dir, *, batch_size, seed, process_index, process_count):
  """The previous pipeline's sampler and batching, yielding each batch's raw records."""
  import grain.python as grain
  source = grain.ArrayRecordDataSource(records.shard_paths(data_dir))
  sampler = grain.IndexSampler(
      num_records=len(source), shuffle=True, num_epochs=None, seed=seed,
      shard_options=grain.ShardOptions(process_index, process_count, drop_remainder=True))
  return iter(grain.DataLoader(data_source=source, sampler=sampler, worker_count=0, operations=[
      grain.Batch(batch_size, drop_remainder=True, batch_fn=list)]))


def _padded_like_before(raw):
  """What the previous per-record Decode + Pad + Batch made of these records."""
  rows = []
  for inst in map(records.decode_record, raw):
    n, k = len(inst["input_ids"]), len(inst["masked_lm_ids"])
    rows.append(dict(
        input_ids=np.pad(inst["input_ids"], (0, SEQ - n)),
        attention_mask=(np.arange(SEQ) < n).astype(np.int32),
        token_type_ids=np.pad(inst["segment_ids"], (0, SEQ - n)),
        masked_lm_positions=np.pad(inst["masked_lm_positions"], (0, PRED - k)),
        masked_lm_ids=np.pad(inst["masked_lm_ids"], (0, PRED - k)),
        masked_lm_weights=(np.arange(PRED) < k).astype(np.float32),
        next_sentence_label=inst["next_sentence_label"]))
  return {k: np.stack([r[k] for r in rows]).astype(rows[0][k].dtype) for k in rows[0]}


@pytest.mark.parametrize("process_index,process_count", [(0, 2), (1, 2), (2, 3)])
def test_same_batches_as_the_per_record_pipeline_and_its_states_resume(
    static_dir, process_index, process_count):
  # 30 batches of 8 per process cross an epoch boundary of the sample (a few hundred records);
  # over 3 processes the records that do not divide are left out (drop_remainder).
  args = dict(batch_size=8, seed=5, process_index=process_index, process_count=process_count)
  old, new = _old_loader(static_dir, **args), _iter(static_dir, **args)
  for _ in range(30):
    expected, got = _padded_like_before(next(old)), next(new)
    assert list(got) == list(expected)       # same keys in the same order
    _assert_same([got], [expected])
  state = old.get_state()                    # what checkpoints of earlier versions hold
  resumed = _iter(static_dir, **args)
  resumed.set_state(state)
  _assert_same([next(resumed)], [_padded_like_before(next(old))])


def test_state_of_another_input_is_a_user_error(static_dir):
  state = _iter(static_dir).get_state()
  with pytest.raises(UserError, match="seed 0 .now 1."):
    _iter(static_dir, seed=1).set_state(state)
  with pytest.raises(UserError, match="field 'format'"):
    _iter(static_dir).set_state({"next_index": 3})


# -- workers, prefetch, resume -----------------------------------------------------------------

def test_resume_with_and_without_workers_is_bit_exact(dynamic_dir):
  """The stream does not depend on the worker count: a state saved with workers resumes
  without them and the other way round, at the same next batch."""
  reference = _take(_iter(dynamic_dir), 9)
  with_workers = _iter(dynamic_dir, worker_count=2, prefetch=2)
  try:
    _assert_same(_take(with_workers, 5), reference[:5])
    state = with_workers.get_state()
    _assert_same(_take(with_workers, 2), reference[5:7])
  finally:
    with_workers.close()
  _assert_same(_take(_resumed_at(dynamic_dir, state), 2), reference[5:7])
  plain = _iter(dynamic_dir)
  _take(plain, 7)
  resumed = _iter(dynamic_dir, worker_count=1)
  try:
    resumed.set_state(plain.get_state())
    _assert_same(_take(resumed, 2), reference[7:9])
  finally:
    resumed.close()


def _resumed_at(data_dir, state):
  it = _iter(data_dir)
  it.set_state(state)
  return it


def test_prefetch_hands_out_the_consumers_state_and_stops_at_the_end(static_dir):
  it = _iter(static_dir, prefetch=3, place=lambda b: dict(b, placed=True))
  first = _take(it, 4)
  assert all(b.pop("placed") for b in first)
  _assert_same(first, _take(_iter(static_dir), 4))
  state = it.get_state()                     # the thread is ahead; the state is not
  expected = next(it)
  expected.pop("placed")
  _assert_same([next(_resumed_at(static_dir, state))], [expected])
  it.close()
  finite = _iter(static_dir, prefetch=2, num_epochs=1, drop_remainder=False, batch_size=100)
  sizes = [len(b["next_sentence_label"]) for b in finite]
  count = records.read_manifest(static_dir)["splits"]["train"]["num_instances"]
  assert sizes == [100] * (count // 100) + [count % 100] * bool(count % 100)


def test_prefetch_raises_the_producers_error():
  class Broken:
    def __init__(self):
      self.n = 0

    def __next__(self):
      self.n += 1
      if self.n == 3:
        raise UserError("record 3: damaged")
      return self.n

    def get_state(self):
      return self.n

    def set_state(self, state):
      self.n = state

  it = Prefetcher(Broken(), depth=2)
  assert [next(it), next(it)] == [1, 2]
  with pytest.raises(UserError, match="record 3: damaged"):
    next(it)


def test_an_error_in_a_batch_does_not_end_the_stream(static_dir, monkeypatch):
  it = _iter(static_dir)
  expected = _take(_iter(static_dir), 2)
  real = records.decode_batch

  def damaged(*args):
    raise UserError("instance record: damaged")

  monkeypatch.setattr(records, "decode_batch", damaged)
  with pytest.raises(UserError, match="damaged"):
    next(it)
  monkeypatch.setattr(records, "decode_batch", real)
  _assert_same(_take(it, 2), expected)       # retried from where it was


def test_a_worker_that_dies_is_a_one_line_error(static_dir):
  import multiprocessing
  it = _iter(static_dir, worker_count=1)
  next(it)
  (worker,) = multiprocessing.active_children()
  os.kill(worker.pid, signal.SIGKILL)
  with pytest.raises(UserError, match=r"worker process died \(exit code -9.*worker_count"):
    for _ in range(100):                     # the batches already built come first
      next(it)
  it.close()


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_workers_exit_when_the_training_process_is_killed(static_dir):
  code = ("import multiprocessing, sys, time\n"
          "from bert_jax.data import pipeline\n"
          "it = pipeline.make_iterator(sys.argv[1], batch_size=8, seq_len=64, max_predictions=10,"
          " seed=0, process_index=0, process_count=1, worker_count=1)\n"
          "next(it)\n"
          "print(multiprocessing.active_children()[0].pid, flush=True)\n"
          "time.sleep(300)\n")
  proc = subprocess.Popen([sys.executable, "-c", code, str(static_dir)], stdout=subprocess.PIPE,
                          text=True)
  worker = int(proc.stdout.readline())
  proc.kill()                                # SIGKILL: no chance to stop its workers
  proc.wait()
  deadline = time.time() + 60
  while _alive(worker) and time.time() < deadline:
    time.sleep(0.2)
  orphaned = _alive(worker)
  if orphaned:
    os.kill(worker, signal.SIGKILL)
  assert not orphaned


def test_default_worker_count(monkeypatch):
  assert [pipeline.default_worker_count(c) for c in (1, 2, 4, 7, 8, 16, 64, 240)] == [
      0, 0, 0, 0, 1, 2, 8, 8]
  monkeypatch.setattr(os, "cpu_count", lambda: 208)
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(208)), raising=False)
  monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE", raising=False)
  monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
  monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
  assert pipeline.default_worker_count() == 8                # one process on the host
  monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")           # one per GPU: 26 cores each
  assert pipeline.default_worker_count() == 3
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))
  assert pipeline.default_worker_count() == 1                # bound to 12 cores already


# -- dynamic masking statistics on real text -------------------------------------------------

@pytest.fixture(scope="module")
def wiki_unmasked(shared_data, tmp_path_factory, vocab):
  """WikiText-2 (part of the validation split) with the MiniLM vocab, unmasked, whole words."""
  root = tmp_path_factory.mktemp("wiki")
  text = (shared_data / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8")
  (root / "wiki.txt").write_text(text[:400_000], encoding="utf-8")
  out = root / "data"
  create.create_data([str(root / "wiki.txt")], vocab, out, max_seq_length=128,
                     max_predictions_per_seq=20, dupe_factor=1, workers=1, progress=False,
                     static_masking=False, whole_word_mask=True)
  return out


def test_dynamic_masking_statistics_on_wikitext(wiki_unmasked):
  man = records.read_manifest(wiki_unmasked)
  cls_id, sep_id, mask_id = (man["vocab"][k] for k in ("cls_id", "sep_id", "mask_id"))
  insts = list(read_instances(wiki_unmasked))
  batch = next(_iter(wiki_unmasked, batch_size=len(insts), seq_len=128, max_predictions=20,
                     shuffle=False, num_epochs=1))
  counts, n_predicted, actions = [], 0, {"mask": 0, "same": 0, "random": 0}
  for row, inst in enumerate(insts):
    ids, cont = inst["input_ids"], inst["continuation"]
    n = len(ids)
    len_a = int(np.argmax(inst["segment_ids"])) - 2
    k = int(batch["masked_lm_weights"][row].sum())
    pos = batch["masked_lm_positions"][row, :k]
    assert (batch["input_ids"][row, n:] == 0).all() and (batch["attention_mask"][row, :n] == 1).all()
    np.testing.assert_array_equal(batch["masked_lm_ids"][row, :k], ids[pos])
    assert not set(pos.tolist()) & {0, len_a + 1, n - 1} and (pos < n).all()   # no CLS/SEP/PAD
    maskable = n - 3
    budget = min(max(int(np.floor(maskable * 0.15 + 0.5)), 1), 20)
    assert 1 <= k <= budget
    counts.append((k, budget))
    # Whole words: a chosen token's word (its start and its continuations) is chosen entirely,
    # and gets one 80/10/10 decision.
    chosen = np.zeros(n, bool)
    chosen[pos] = True
    word = np.cumsum(~cont | np.isin(np.arange(n), [0, 1, len_a + 1, len_a + 2, n - 1])) - 1
    for w in np.unique(word[chosen]):
      members = word == w
      assert chosen[members].all()
      got = batch["input_ids"][row, :n][members]
      assert (got == mask_id).all() or not (got == mask_id).any()
    out = batch["input_ids"][row, pos]
    actions["mask"] += int((out == mask_id).sum())
    actions["same"] += int((out == ids[pos]).sum())
    actions["random"] += int(((out != mask_id) & (out != ids[pos])).sum())
    n_predicted += k
    assert not np.isin(batch["input_ids"][row, :n], [0])[1:n - 1].any()
    assert batch["input_ids"][row, 0] == cls_id and batch["input_ids"][row, n - 1] == sep_id
  fractions = {k: v / n_predicted for k, v in actions.items()}
  assert n_predicted > 10_000
  assert abs(fractions["mask"] - 0.8) < 0.03 and abs(fractions["same"] - 0.1) < 0.02, fractions
  assert abs(fractions["random"] - 0.1) < 0.02, fractions
  # Whole words that would overflow the budget are skipped, so a row can fall a little short.
  k, budget = np.array(counts).T
  assert (k == budget).mean() > 0.9 and k.sum() / budget.sum() > 0.97
  # The cap: a phase with fewer predictions than 15% of the tokens.
  capped = next(_iter(wiki_unmasked, batch_size=64, seq_len=128, max_predictions=5,
                      shuffle=False))
  assert capped["masked_lm_weights"].shape == (64, 5)
  full = capped["attention_mask"].sum(1) > 60
  assert (capped["masked_lm_weights"].sum(1)[full] <= 5).all()
  assert (capped["masked_lm_weights"].sum(1)[full] >= 3).all()
