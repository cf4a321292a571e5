"""A task's model over a set of features: the forward pass, the task's loss as a steps.Loss,
the eval step (the task's predictions plus the loss's sums from the same forward pass), and the
one loop that runs it over batches for evaluation during training and for `predict` alike.

Evaluation goes through sums: each batch gives the loss's additive sums, the loop adds them up
and `Loss.metrics` turns the totals into the validation loss once (a mean over all real rows,
or tokens, whatever the batches' sizes or padding).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.data.batch import pad_last
from bert_jax.modeling.model import Packed
from bert_jax.training.steps import Loss


def forward(model, params, batch, key=None):
  """The model's outputs for a batch (packed or one sequence per row); dropout when `key` is
  given."""
  extra = {}
  if "sequence_ids" in batch:
    extra["packed"] = Packed(batch["position_ids"], batch["sequence_ids"],
                             batch["sequence_rows"], batch["sequence_starts"])
  return model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                     batch.get("attention_mask"), deterministic=key is None,
                     rngs=None if key is None else {"dropout": key}, **extra)


def output_sums(task, outputs, batch) -> dict[str, jax.Array]:
  """The task's summed loss over the real rows (or tokens) of a batch, and their count."""
  return {"loss_sum": task.loss(outputs, batch), "count": task.count(batch)}


def task_loss(task, model) -> Loss:
  """The task's loss as a steps.Loss: summed over the real rows (or tokens) of the whole step,
  so accumulated micro-batches add up to one batch, and eval batches to one evaluation."""
  def metrics(s):
    return {"loss": s["loss_sum"] / jnp.maximum(s["count"], 1.0), "count": s["count"]}
  return Loss(sums=lambda params, batch, key: output_sums(task, forward(model, params, batch,
                                                                         key), batch),
              counts=lambda batch: {"count": task.count(batch)},
              terms=(("loss_sum", "count"),), metrics=metrics)


def make_eval_step(task, model, *, with_loss: bool, keep_logits: bool = False) -> Callable:
  """-> eval_step(params, batch) -> (the task's predictions [+ "logits"], the loss's sums
  ({} without labels)): one deterministic pass for both."""
  def eval_step(params, batch):
    outputs = forward(model, params, batch)
    predictions = dict(task.predict(outputs, batch))
    if keep_logits:
      predictions["logits"] = outputs
    return predictions, output_sums(task, outputs, batch) if with_loss else {}
  return eval_step


def run_batches(step: Callable[[dict], tuple[Mapping, Mapping]], n_rows: int,
                batches: Iterable[np.ndarray], build: Callable[[np.ndarray], dict],
                seq_outputs: tuple[str, ...], max_len: int) -> tuple[dict[str, np.ndarray], dict]:
  """(every row's outputs in row order, the summed loss sums). `build(idx)` makes the host
  batch of rows `idx`, `step(batch)` runs it; outputs with a token axis are padded back to
  `max_len` (logits with -1e9, so they never win)."""
  out: dict[str, np.ndarray] = {}
  totals: dict[str, Any] = {}
  for idx in batches:
    predictions, sums = step(build(idx))
    totals = {k: totals[k] + v if k in totals else v for k, v in sums.items()}
    for k, v in jax.device_get(predictions).items():
      v = np.asarray(v)[:len(idx)]
      if k in seq_outputs and v.shape[-1] < max_len:
        v = pad_last(v, max_len, -1e9 if np.issubdtype(v.dtype, np.floating) else 0)
      out.setdefault(k, np.zeros((n_rows,) + v.shape[1:], v.dtype))[idx] = v
  return out, jax.device_get(totals)
