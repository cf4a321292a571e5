"""The fine-tuning loop: load an init, length-bucketed batches, a jitted train step with donated
state, large sorted eval batches, keep the best evaluation, export to transformers.

Speed on small inputs comes from padding each batch only to the smallest bucket (16, 32, 64,
... up to max_seq_length) that holds its longest row, so jit compiles a handful of shapes, and
from grouping rows of similar length (sorted within shuffled windows of 50 batches).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import time
from typing import Any

import numpy as np

from bert_jax.errors import UserError
from bert_jax.fileio import check_writable, write_json_atomic
from bert_jax.finetune.specs import TASKS, Task
from bert_jax.finetune.tasks import Features
from bert_jax.lock import DirLock

SORT_WINDOW_BATCHES = 50
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


# ----------------------------------------------------------------------------- batching

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
    batch["labels"][len(idx):] = -100
  batch["weight"] = (np.arange(batch_size) < len(idx)).astype(np.float32)
  return batch


# ----------------------------------------------------------------------------- optimisation

def decay_mask(params):
  """Weight decay on kernels and embeddings; not on biases or LayerNorm (as BERT and HF)."""
  import jax

  def wanted(path, _):
    names = [getattr(p, "key", str(p)) for p in path]
    return names[-1] != "bias" and not any("LayerNorm" in n for n in names)
  return jax.tree_util.tree_map_with_path(wanted, params)


def make_optimizer(learning_rate: float, total_updates: int, warmup_updates: int,
                   weight_decay: float, max_grad_norm: float, accumulation: int):
  """AdamW (bias-corrected, decoupled decay), linear warmup then linear decay to 0."""
  import optax
  decay = optax.linear_schedule(learning_rate, 0.0, max(total_updates - warmup_updates, 1))
  schedule = decay if warmup_updates == 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_updates), decay], [warmup_updates])
  parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
  tx = optax.chain(*parts, optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                                       weight_decay=weight_decay, mask=decay_mask))
  return optax.MultiSteps(tx, every_k_schedule=accumulation) if accumulation > 1 else tx


# ----------------------------------------------------------------------------- init

def load_init(opts):
  """(config, pretrained params or None, tokenizer, vocab_path)."""
  from bert_jax import convert
  from bert_jax.config import get_preset
  from bert_jax.tokenizer import find_lower_case, find_vocab, load_tokenizer
  lower = {"auto": None, "yes": True, "no": False}[opts.lower_case]
  if opts.init == "random":
    if not opts.vocab:
      raise UserError("--vocab is required with --init random (a vocab.txt)")
    tokenizer = load_tokenizer(opts.vocab, lower)
    config = get_preset(opts.preset, vocab_size=tokenizer.vocab_size)
    return config, None, tokenizer, opts.vocab
  config, params = convert.load_pretrained(opts.init, seed=opts.seed, verbose=False)
  vocab = opts.vocab or find_vocab(opts.init)
  if not vocab:
    raise UserError(f"{opts.init}: no vocab.txt (or tokenizer.json) found; pass --vocab")
  if lower is None:
    lower = find_lower_case(opts.init, vocab)
  tokenizer = load_tokenizer(vocab, lower)
  if tokenizer.vocab_size != config.vocab_size:
    raise UserError(f"{vocab}: {tokenizer.vocab_size} tokens but the checkpoint {opts.init} "
                    f"has vocab_size {config.vocab_size}; use the checkpoint's own vocab")
  return config, params, tokenizer, vocab


def merge_pretrained(fresh: dict, pretrained: dict | None, source: str) -> dict:
  """`fresh` with every leaf the pretrained tree has at the same path and shape. The encoder
  must fit; a head of another shape (other num_labels) stays freshly initialised."""
  if pretrained is None:
    return fresh
  kept_fresh = []

  def merge(f, p, path):
    if isinstance(f, dict):
      return {k: merge(v, p.get(k) if isinstance(p, dict) else None, path + (k,))
              for k, v in f.items()}
    if p is not None and tuple(np.shape(p)) == tuple(np.shape(f)):
      return np.asarray(p, np.float32)
    if p is not None and path[0] == "bert":
      raise UserError(f"{source}: tensor {'/'.join(path)} has shape {np.shape(p)}; the model "
                      f"needs {np.shape(f)}")
    kept_fresh.append("/".join(path))
    return f
  merged = merge(fresh, pretrained, ())
  if kept_fresh:
    heads = sorted({p.split("/")[0] for p in kept_fresh})
    print(f"freshly initialised: {', '.join(heads)} ({len(kept_fresh)} tensors)", file=sys.stderr)
  return merged


# ----------------------------------------------------------------------------- the run

class Runner:
  def __init__(self, opts):
    import jax
    self.opts = opts
    self.task: Task = TASKS[opts.task](opts)
    self.config, pretrained, self.tokenizer, self.vocab = load_init(opts)
    if opts.dtype:
      self.config = self.config.replace(dtype=opts.dtype)
    if opts.max_seq_length > self.config.max_position_embeddings:
      raise UserError(f"--max-seq-length {opts.max_seq_length} exceeds the model's "
                      f"max_position_embeddings {self.config.max_position_embeddings}")
    self.train_feats, self.eval_feats = self.task.load(self.tokenizer)
    if not len(self.train_feats):
      raise UserError(f"{opts.train_file}: no training records")
    self.model = self.task.model(self.config)
    self.mesh, self.n_data = self._mesh()
    key = jax.random.key(opts.seed)
    example = {k: self.train_feats.arrays[k][:1, ..., :16] for k in MODEL_INPUTS}
    import flax.linen as nn
    fresh = jax.jit(self.model.init)(key, **example)["params"]
    fresh = jax.tree_util.tree_map(np.asarray, nn.unbox(fresh))
    self.params = merge_pretrained(fresh, pretrained, opts.init)
    self.buckets = make_buckets(opts.max_seq_length, opts.smallest_bucket)

  def _mesh(self):
    import jax
    try:
      from bert_jax import sharding
    except ImportError:  # no sharding module: one device
      return None, 1
    mesh = sharding.make_mesh(data=-1)
    n = jax.device_count()
    if n > 1 and self.opts.batch_size % n:
      raise UserError(f"--batch-size {self.opts.batch_size} must be a multiple of the {n} "
                      "devices (data parallel)")
    if n > 1:
      print(f"data parallel over {n} devices", file=sys.stderr)
    return mesh, n

  def _put(self, tree, batch: bool):
    import jax
    if self.mesh is None:
      return jax.device_put(tree)
    from bert_jax import sharding
    if batch:
      return sharding.global_batch(tree, self.mesh)
    return jax.device_put(tree, sharding.replicated(self.mesh))

  # -- steps ----------------------------------------------------------------------------

  def _compile(self, tx):
    import jax
    import jax.numpy as jnp
    import optax
    model, task = self.model, self.task

    def forward(params, batch, deterministic, rng=None):
      return model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                         batch["attention_mask"], deterministic=deterministic,
                         rngs=None if rng is None else {"dropout": rng})

    def train_step(state, batch):
      rng = jax.random.fold_in(state["rng"], state["step"])

      def loss_fn(params):
        total, count = task.loss(forward(params, batch, False, rng), batch)
        return total / jnp.maximum(count, 1.0)
      loss, grads = jax.value_and_grad(loss_fn)(state["params"])
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
              "step": state["step"] + 1, "rng": state["rng"]}, loss

    def eval_step(params, batch):
      return task.predict(forward(params, batch, True), batch)

    self.train_step = jax.jit(train_step, donate_argnums=(0,))
    self.eval_step = jax.jit(eval_step)

  def evaluate(self, params) -> tuple[dict, dict]:
    feats, o = self.eval_feats, self.opts
    keys = tuple(k for k in (*MODEL_INPUTS, "choice_mask") if k in feats.arrays)
    eval_bs = max(o.eval_batch_size // self.n_data, 1) * self.n_data
    out: dict[str, np.ndarray] = {}
    T = o.max_seq_length
    for idx in eval_batches(feats.lengths, eval_bs):
      batch = make_batch(feats, idx, eval_bs, self.buckets, keys)
      result = jax_get(self.eval_step(params, self._put(batch, batch=True)))
      for k, v in result.items():
        v = v[:len(idx)]
        if k in self.task.seq_outputs and v.shape[-1] < T:
          fill = -1e9 if np.issubdtype(v.dtype, np.floating) else 0
          v = np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, T - v.shape[-1])], constant_values=fill)
        if k not in out:
          out[k] = np.zeros((len(feats),) + v.shape[1:], v.dtype)
        out[k][idx] = v
    return self.task.score(feats, out), out

  # -- loop -----------------------------------------------------------------------------

  def run(self) -> dict[str, Any]:
    import jax
    from tqdm import tqdm
    o = self.opts
    steps_per_epoch = -(-len(self.train_feats) // o.batch_size)
    total_micro = steps_per_epoch * o.epochs
    total_updates = max(total_micro // o.gradient_accumulation, 1)
    warmup = int(round(o.warmup_ratio * total_updates))
    tx = make_optimizer(o.learning_rate, total_updates, warmup, o.weight_decay,
                        o.max_grad_norm, o.gradient_accumulation)
    self._compile(tx)
    params = self._put(self.params, batch=False)
    state = {"params": params, "opt_state": jax.jit(tx.init)(params),
             "step": jax.numpy.zeros((), jax.numpy.int32), "rng": jax.random.key(o.seed + 1)}
    keys = tuple(k for k in self.train_feats.arrays)
    rng = np.random.default_rng(o.seed)
    self.best, self.history = None, []
    self.train_seconds = self.eval_seconds = 0.0
    update, loss_value = 0, float("nan")
    bar = tqdm(total=total_micro, desc=f"fine-tune {o.task}", unit="step", mininterval=1.0,
               disable=o.quiet, file=sys.stderr)
    t0 = time.perf_counter()
    for epoch in range(o.epochs):
      for micro, idx in enumerate(train_batches(self.train_feats.lengths, o.batch_size, rng)):
        batch = make_batch(self.train_feats, idx, o.batch_size, self.buckets, keys)
        state, loss = self.train_step(state, self._put(batch, batch=True))
        bar.update(1)
        if (micro + 1) % o.gradient_accumulation:
          continue
        update += 1
        if update % 20 == 0:
          loss_value = float(loss)
          bar.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch + 1)
        if o.eval_every and update % o.eval_every == 0:
          t0 = self._timed_eval(state, epoch, update, t0)
      # Without --eval-every: after every epoch; with it: also once at the very end.
      if not o.eval_every or (epoch == o.epochs - 1 and update % o.eval_every):
        t0 = self._timed_eval(state, epoch, update, t0)
    bar.close()
    jax.block_until_ready(state["params"])
    return self._finish()

  def _timed_eval(self, state, epoch, update, t0) -> float:
    import jax
    jax.block_until_ready(state["params"])
    t1 = time.perf_counter()
    self.train_seconds += t1 - t0
    scores, out = self.evaluate(state["params"])
    record = {"epoch": epoch + 1, "step": update,
              **{k: int(v) if isinstance(v, (int, np.integer)) else float(v)
                 for k, v in scores.items()}}
    self.history.append(record)
    main = self.task.main_metric
    better = self.best is None or record[main] > self.best[main]
    summary = " ".join(f"{k}={v:.4f}" for k, v in scores.items())
    print(f"eval step {update} (epoch {epoch + 1}): {summary}" + (" (best)" if better else ""),
          file=sys.stderr)
    if better:
      self.best = record
      self.best_params = jax.tree_util.tree_map(np.asarray, jax.device_get(state["params"]))
      self._save_best(out)
    t2 = time.perf_counter()
    self.eval_seconds += t2 - t1
    return t2

  def _save_best(self, out) -> None:
    from bert_jax.checkpoint import write_checkpoint
    o = self.opts
    d = pathlib.Path(o.output_dir)
    d.mkdir(parents=True, exist_ok=True)
    self.task.write_predictions(str(d), self.eval_feats, out)
    # A complete new best/ replaces the old one only once fully written.
    tmp = d / ".best.new"
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, self.config, self.best_params, vocab_path=self.vocab,
                     lower_case=self.tokenizer.lower_case)
    info = {**self.task.finetune_info(), "max_seq_length": o.max_seq_length, **self.best}
    write_json_atomic(tmp / "finetune.json", info, ensure_ascii=False, sort_keys=False)
    old = d / ".best.old"
    shutil.rmtree(old, ignore_errors=True)
    if (d / "best").exists():
      os.rename(d / "best", old)
    os.rename(tmp, d / "best")
    shutil.rmtree(old, ignore_errors=True)
    self._write_metrics()

  def _write_metrics(self) -> None:
    metrics = {**self.best, "train_seconds": round(self.train_seconds, 2),
               "eval_seconds": round(self.eval_seconds, 2), "history": self.history}
    write_json_atomic(pathlib.Path(self.opts.output_dir) / "metrics.json", metrics,
                      ensure_ascii=False, sort_keys=False)

  def _finish(self) -> dict[str, Any]:
    from bert_jax import convert
    o = self.opts
    self._write_metrics()
    if o.export_hf:
      convert.write_hf_dir(o.export_hf, self.config, self.best_params, vocab_path=self.vocab,
                           lower_case=self.tokenizer.lower_case,
                           architectures=(self.task.architecture,),
                           extra_config=self.task.hf_config())
    return {**self.best, "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds}


def jax_get(tree):
  import jax
  return {k: np.asarray(v) for k, v in jax.device_get(tree).items()}


def finetune(opts) -> dict[str, Any]:
  """Runs a whole fine-tuning from parsed CLI options; returns the best evaluation. The output
  locations are checked before anything is loaded (not after training), and --output-dir is
  locked for the run."""
  check_writable(opts.output_dir, "--output-dir")
  if opts.export_hf:
    check_writable(opts.export_hf, "--export-hf")
    p = pathlib.Path(opts.export_hf)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
      raise UserError(f"--export-hf {p}: already exists and is not empty")
  with DirLock(opts.output_dir, "--output-dir"):
    return Runner(opts).run()
