"""The fine-tuning loop: load an init, packed or length-bucketed batches, the shared train state
and step (training.state, training.steps: mesh shardings, donation, accumulation, several
processes) with the task's loss, large eval batches, keep the best evaluation, export to
transformers.

Speed on short inputs: the [CLS] heads pack several sequences into each row (packing.py: one
compiled shape, mostly real tokens); the other tasks pad each batch only to the smallest
length bucket that holds its longest row (batching.py). Evaluation (evaluate.py) gives the
task's predictions and the loss's sums, so the validation loss is one mean over all rows.
"""

from __future__ import annotations

import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np

from bert_jax.convert import FINETUNE_INFO
from bert_jax.data.batch import join_micro
from bert_jax.devices import platforms, xla_cache
from bert_jax.errors import UserError
from bert_jax.finetune import outputs, packing
from bert_jax.finetune.batching import eval_batches, make_batch, make_buckets, train_batches
from bert_jax.finetune.evaluate import make_eval_step, run_batches, task_loss
from bert_jax.finetune.featurize import Features
from bert_jax.finetune.run_config import FinetuneConfig
from bert_jax.finetune.tasks import TASKS, Task
from bert_jax.modeling import attention, kernel_check
from bert_jax.storage.fileio import check_writable, write_json_atomic
from bert_jax.training import sharding, steps
from bert_jax.training import state as state_lib
from bert_jax.training.lock import DirLock
from bert_jax.training.optim import finetune_optimizer
from bert_jax.training.preemption import Preemption
from bert_jax.training.remat import LEVELS, NAMES

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


# ----------------------------------------------------------------------------- init

def load_init(cfg: FinetuneConfig):
  """(model config, pretrained params or None, tokenizer, vocab_path)."""
  from bert_jax import convert
  from bert_jax.config import get_preset, read_config_json
  from bert_jax.tokenizer import find_lower_case, find_vocab, load_tokenizer
  lower = {"auto": None, "yes": True, "no": False}[cfg.lower_case]
  if cfg.init == "random":
    if not cfg.vocab:
      raise UserError("--vocab is required with --init random (a vocab.txt)")
    tokenizer = load_tokenizer(cfg.vocab, lower)
    if cfg.preset.endswith(".json"):  # a model of any size: a BERT config.json
      model_config = read_config_json(cfg.preset).replace(vocab_size=tokenizer.vocab_size)
    else:
      model_config = get_preset(cfg.preset, vocab_size=tokenizer.vocab_size)
    return model_config, None, tokenizer, cfg.vocab
  model_config, params = convert.load_pretrained(cfg.init, seed=cfg.seed, verbose=False,
                                                 fresh_heads=False)
  vocab = cfg.vocab or find_vocab(cfg.init)
  if not vocab:
    raise UserError(f"{cfg.init}: no vocab.txt (or tokenizer.json) found; pass --vocab")
  if lower is None:
    lower = find_lower_case(cfg.init, vocab)
  tokenizer = load_tokenizer(vocab, lower)
  if tokenizer.vocab_size != model_config.vocab_size:
    raise UserError(f"{vocab}: {tokenizer.vocab_size} tokens but the checkpoint {cfg.init} "
                    f"has vocab_size {model_config.vocab_size}; use the checkpoint's own vocab")
  return model_config, params, tokenizer, vocab


# ----------------------------------------------------------------------------- the run

class Runner:
  """One fine-tuning run on a (data, fsdp, tensor) mesh, one or several processes: the train
  state and step are the pretraining ones (training.state, training.steps) with the task's
  loss. Process 0 writes; every process feeds its share of each batch."""

  def __init__(self, cfg: FinetuneConfig):
    self.cfg = cfg
    self.task: Task = TASKS[cfg.task](cfg)
    self.packed = self.task.packable if cfg.packing is None else cfg.packing
    if self.packed and not self.task.packable:
      raise UserError(f"--packing: the {cfg.task} task reads every position of a row; packing "
                      "is for the [CLS] heads (classification)")
    self.model_config, self.pretrained, self.tokenizer, self.vocab = load_init(cfg)
    self.model_config = self.model_config.replace(
        dtype=platforms.compute_dtype(cfg.dtype, jax.devices()[0]), attention=cfg.attention,
        remat=LEVELS[cfg.remat])
    if cfg.max_seq_length > self.model_config.max_position_embeddings:
      raise UserError(f"--max-seq-length {cfg.max_seq_length} exceeds the model's "
                      f"max_position_embeddings {self.model_config.max_position_embeddings}")
    self.train_feats, self.eval_feats = self.task.load(self.tokenizer)
    if not len(self.train_feats):
      raise UserError(f"{cfg.train_file}: no training records")
    self.model = self.task.model(self.model_config)
    self.mesh = sharding.make_mesh(**sharding.parse_mesh_flag(cfg.mesh, "--mesh"))
    self.process_count, self.process_index = jax.process_count(), jax.process_index()
    # Rows of a micro-batch (and of an eval batch) split evenly over the batch shards and the
    # processes feeding them.
    self.unit = math.lcm(self.mesh.shape["data"] * self.mesh.shape["fsdp"], self.process_count)
    if cfg.batch_size % self.unit:
      raise UserError(f"--batch-size {cfg.batch_size}: expected a multiple of {self.unit} "
                      f"(the mesh {dict(self.mesh.shape)} splits each batch over data x fsdp"
                      f"{f' and {self.process_count} processes' if self.process_count > 1 else ''})")
    if self.process_index == 0:
      device, mc = self.mesh.devices.flat[0], self.model_config
      print(f"mesh {dict(self.mesh.shape)} over {self.mesh.devices.size} device(s); "
            f"{platforms.describe_dtype(cfg.dtype, device)}; "
            + attention.describe(mc.attention, device.platform,
                                 mc.attention_probs_dropout_prob, mc.dtype, self.packed)
            + (f"; remat {NAMES[mc.remat]}: each layer recomputed in the backward pass"
               if mc.remat else ""), file=sys.stderr)
    self.buckets = make_buckets(cfg.max_seq_length, cfg.smallest_bucket)
    checked = kernel_check.verify(self.model_config, [cfg.max_seq_length] if self.packed
                                  else self.buckets, self.packed)
    if checked and self.process_index == 0:
      print(checked, file=sys.stderr)
    self.train_rows = self.eval_rows = 0  # a packed run's rows per step, set by _epochs
    self.is_writer = self.process_index == 0

  # -- state and steps ----------------------------------------------------------------------

  def _build(self, total_updates: int):
    cfg = self.cfg
    warmup = int(round(cfg.warmup_ratio * total_updates))
    optimizer, schedule = finetune_optimizer(cfg.learning_rate, total_updates, warmup,
                                             cfg.weight_decay, cfg.max_grad_norm, cfg.lr_schedule)
    example = {k: self.train_feats.arrays[k][:1, ..., :16] for k in MODEL_INPUTS}
    init_fn = lambda key: self.model.init({"params": key}, **example)["params"]
    state, shardings = state_lib.create_state(init_fn, optimizer, self.mesh,
                                              jax.random.PRNGKey(cfg.seed),
                                              init_params=self.pretrained, source=cfg.init)
    self.pretrained = None
    self.loss = task_loss(self.task, self.model)
    self.train_step = steps.jit_train_step(
        steps.make_train_step(self.loss, optimizer, schedule,
                              grad_accum=cfg.gradient_accumulation), self.mesh, shardings)
    self.eval_step = steps.MeshStep(
        make_eval_step(self.task, self.model, with_loss=True), self.mesh,
        in_shardings=(shardings.params, sharding.batch_sharding(self.mesh)),
        out_shardings=sharding.replicated(self.mesh))
    self.gather = jax.jit(lambda tree: tree, out_shardings=sharding.replicated(self.mesh))
    return state

  def _put(self, batch: dict) -> dict:
    """This process's share of a global host batch, assembled into sharded global arrays."""
    def share(v):
      rows = len(v) // self.process_count
      return v[self.process_index * rows:(self.process_index + 1) * rows]
    return sharding.global_batch({k: share(v) for k, v in batch.items()}, self.mesh)

  def _epochs(self, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Every epoch's micro-batches (row indices), planned up front so that a packed run knows
    its rows per step before the first one."""
    cfg, lengths = self.cfg, self.train_feats.lengths
    if not self.packed:
      return [train_batches(lengths, cfg.batch_size, rng) for _ in range(cfg.epochs)]
    epochs = [packing.balanced_batches(lengths, cfg.batch_size, rng) for _ in range(cfg.epochs)]
    epochs, self.train_rows = packing.fit_rows(epochs, lengths, cfg.max_seq_length, self.unit)
    # Evaluation batches hold eval_batch_size sequences in proportionally many rows.
    eval_bs = self._eval_batch_size()
    self.eval_rows = min(eval_bs, math.ceil(self.train_rows * eval_bs / cfg.batch_size
                                            / self.unit) * self.unit)
    return epochs

  def _eval_batch_size(self) -> int:
    return max(self.cfg.eval_batch_size // self.unit, 1) * self.unit

  def _micro_batch(self, feats: Features, idx: np.ndarray, sequences: int, rows: int,
                   keys: tuple[str, ...]) -> dict:
    if self.packed:
      return packing.packed_batch(feats, idx, sequences, rows, keys)
    return make_batch(feats, idx, sequences, self.buckets, keys)

  def _step_batch(self, group: list[np.ndarray], keys: tuple[str, ...]) -> dict:
    """A train step's rows: the group's micro-batches padded to one length, interleaved so that
    micro-batch i is rows i, i+A, ... (steps' accumulation layout); a short last group is
    filled with weightless copies."""
    cfg, feats = self.cfg, self.train_feats
    micros = [self._micro_batch(feats, idx, cfg.batch_size, self.train_rows, keys)
              for idx in group]
    while len(micros) < cfg.gradient_accumulation:
      micros.append(dict(micros[-1], weight=np.zeros_like(micros[-1]["weight"])))
    return join_micro(micros, feats.seq_keys)

  # -- evaluation ---------------------------------------------------------------------------

  def evaluate(self, params) -> tuple[dict, dict]:
    """(validation loss and the task's scores, every row's predictions): one pass whose eval
    batches give the loss's sums, added up and made a mean once."""
    feats, eval_bs = self.eval_feats, self._eval_batch_size()
    keys = tuple(feats.arrays)  # labels too: the loss's sums
    if self.packed:
      batches = packing.eval_packs(feats.lengths, self.cfg.max_seq_length, self.eval_rows,
                                   eval_bs)
    else:
      batches = eval_batches(feats.lengths, eval_bs)
    out, sums = run_batches(
        lambda batch: self.eval_step(params, self._put(batch)), len(feats), batches,
        lambda idx: self._micro_batch(feats, idx, eval_bs, self.eval_rows, keys),
        self.task.seq_outputs, self.cfg.max_seq_length)
    loss = float(self.loss.metrics(sums)["loss"])
    return {"validation_loss": loss, **self.task.score(feats, out)}, out

  # -- loop -----------------------------------------------------------------------------------

  def run(self) -> dict[str, Any]:
    from tqdm import tqdm
    cfg = self.cfg
    accum = cfg.gradient_accumulation
    micro_per_epoch = -(-len(self.train_feats) // cfg.batch_size)
    updates_per_epoch = -(-micro_per_epoch // accum)
    self.total_updates = updates_per_epoch * cfg.epochs
    state = self._build(self.total_updates)
    base_rng = jax.random.PRNGKey(cfg.seed + 1)
    keys = tuple(k for k in self.train_feats.arrays)
    epochs = self._epochs(np.random.default_rng(cfg.seed))
    self.best, self.history, self.losses = None, [], []
    self.train_seconds = self.eval_seconds = 0.0
    update = 0
    bar = tqdm(total=updates_per_epoch * cfg.epochs, desc=f"fine-tune {cfg.task}", unit="step",
               mininterval=1.0, disable=cfg.quiet or not self.is_writer, file=sys.stderr)
    t0 = time.perf_counter()
    with Preemption() as stop:
      for epoch in range(cfg.epochs):
        micros = epochs[epoch]
        for first in range(0, len(micros), accum):
          batch = self._put(self._step_batch(micros[first:first + accum], keys))
          state, metrics = self.train_step(state, batch, base_rng)
          self.losses.append(metrics["loss"])  # device scalars: fetched at the next evaluation
          update += 1
          bar.update(1)
          if update % 20 == 0:
            bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", epoch=epoch + 1)
          if cfg.eval_every and update % cfg.eval_every == 0:
            t0 = self._timed_eval(state, epoch, update, t0)
          if stop.requested:  # SIGTERM: the best so far stays; marked incomplete, no export
            bar.close()
            return self._finish(stopped_at=update)
        # Without --eval-every: after every epoch; with it: also once at the very end.
        if not cfg.eval_every or (epoch == cfg.epochs - 1 and update % cfg.eval_every):
          t0 = self._timed_eval(state, epoch, update, t0)
    bar.close()
    return self._finish()

  def _timed_eval(self, state, epoch, update, t0) -> float:
    jax.block_until_ready(state.params)
    t1 = time.perf_counter()
    self.train_seconds += t1 - t0
    scores, out = self.evaluate(state.params)
    train_loss = float(np.mean(jax.device_get(self.losses))) if self.losses else None
    self.losses = []
    record = {"epoch": epoch + 1, "step": update, "train_loss": train_loss,
              **{k: int(v) if isinstance(v, (int, np.integer)) else float(v)
                 for k, v in scores.items()}}
    self.history.append(record)
    main = self.task.main_metric
    better = self.best is None or record[main] > self.best[main]
    if self.is_writer:
      summary = " ".join(f"{k}={v:.4f}" for k, v in scores.items())
      print(f"eval step {update} (epoch {epoch + 1}): {summary}" + (" (best)" if better else ""),
            file=sys.stderr)
    if better:
      self.best = record
      # Every process takes part in gathering sharded params; process 0 keeps and writes them.
      self.best_params = jax.tree.map(np.asarray, self.gather(state.params))
      if self.is_writer:
        self._save_best(out)
    t2 = time.perf_counter()
    self.eval_seconds += t2 - t1
    return t2

  def _save_best(self, out) -> None:
    from bert_jax.storage.checkpoint import disk_full_error
    try:
      self._write_best(out)
    except Exception as e:
      full = disk_full_error(e, pathlib.Path(self.cfg.output_dir))
      if full is None:
        raise
      raise UserError(f"{full}: the best model so far was not saved") from None

  def _write_best(self, out) -> None:
    from bert_jax.storage.checkpoint import write_checkpoint
    cfg = self.cfg
    d = pathlib.Path(cfg.output_dir)
    d.mkdir(parents=True, exist_ok=True)
    self.task.write_predictions(str(d), self.eval_feats, out)
    # A complete new best/ replaces the old one only once fully written.
    tmp = d / ".best.new"
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, self.model_config, self.best_params, vocab_path=self.vocab,
                     lower_case=self.tokenizer.lower_case)
    info = {**self.task.finetune_info(), "max_seq_length": cfg.max_seq_length, **self.best}
    write_json_atomic(tmp / FINETUNE_INFO, info, ensure_ascii=False, sort_keys=False)
    old = d / ".best.old"
    shutil.rmtree(old, ignore_errors=True)
    if (d / "best").exists():
      os.rename(d / "best", old)
    os.rename(tmp, d / "best")
    shutil.rmtree(old, ignore_errors=True)
    self._write_metrics(stopped_at=self.best["step"])

  def _write_metrics(self, stopped_at: int | None = None) -> None:
    """metrics.json; `stopped_at`: the step of a run that has not finished (yet)."""
    status = ({"status": outputs.COMPLETE} if stopped_at is None else
              {"status": outputs.INCOMPLETE, "stopped_at_step": stopped_at})
    metrics = {**status, "total_steps": self.total_updates, **(self.best or {}),
               "train_seconds": round(self.train_seconds, 2),
               "eval_seconds": round(self.eval_seconds, 2), "history": self.history}
    pathlib.Path(self.cfg.output_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(pathlib.Path(self.cfg.output_dir) / outputs.METRICS, metrics,
                      ensure_ascii=False, sort_keys=False)

  def _finish(self, stopped_at: int | None = None) -> dict[str, Any]:
    from bert_jax import convert
    cfg = self.cfg
    status = {"status": outputs.COMPLETE if stopped_at is None else outputs.INCOMPLETE}
    if not self.is_writer:
      return {**(self.best or {}), **status}
    self._write_metrics(stopped_at)
    if stopped_at is not None:
      print(f"stopped at step {stopped_at} of {self.total_updates}: {cfg.output_dir} holds the "
            "best evaluation so far, marked incomplete in metrics.json", file=sys.stderr)
    elif cfg.export_hf:
      convert.write_hf_dir(cfg.export_hf, self.model_config, self.best_params,
                           vocab_path=self.vocab,
                           lower_case=self.tokenizer.lower_case,
                           architectures=(self.task.architecture,),
                           extra_config=self.task.hf_config())
    return {**(self.best or {}), **status, "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds}


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
  """Runs a whole fine-tuning; returns the best evaluation. The output
  locations are checked before anything is loaded (not after training), and --output-dir is
  locked for the run (by process 0 when several processes run it together)."""
  sharding.initialize_distributed()
  xla_cache.enable(cfg.compilation_cache)
  check_writable(cfg.output_dir, "--output-dir")
  if cfg.export_hf:
    outputs.check_export_hf(cfg.export_hf, cfg.output_dir)
  outputs.check_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
  if jax.process_index() != 0:
    return Runner(cfg).run()
  with DirLock(cfg.output_dir, "--output-dir"):
    return Runner(cfg).run()
