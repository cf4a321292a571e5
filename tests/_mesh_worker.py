"""Shared tiny pretraining setup for the step/sharding tests, and a subprocess worker.

As a script it runs a few train steps on each requested mesh (or as one process of a
jax.distributed run) and prints one JSON line per mesh: {"mesh": ..., "losses": [...]}.
XLA_FLAGS must be set before jax is imported, hence a subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

VOCAB, SEQ, PRED, BATCH = 128, 16, 4, 8


def make_cfg(total_steps: int = 10, **optim):
  import ml_collections
  o = dict(name="adamw", learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01,
           bias_correction=False, clip_norm=1.0, warmup_steps=2, schedule="continuous",
           decay_power=1.0, end_learning_rate=0.0)
  o.update(optim)
  return ml_collections.ConfigDict(dict(
      total_steps=total_steps,
      phases=[dict(fraction=0.9, seq_len=SEQ, max_predictions=PRED, batch_size=BATCH,
                   grad_accum=1, data="", warmup_steps=-1, learning_rate=-1.0),
              dict(fraction=0.1, seq_len=2 * SEQ, max_predictions=2 * PRED,
                   batch_size=BATCH, grad_accum=1, data="", warmup_steps=-1,
                   learning_rate=-1.0)],
      optim=o))


def tiny_model_config(dropout: float = 0.0, dtype: str = "float32"):
  from bert_jax.config import BertConfig
  return BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                    hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                    dtype=dtype)


def state_copies(compiled) -> list[str]:
  """The copies in a compiled step's entry computation shaped like one of its (matrix-shaped)
  arguments: none where the update writes the donated params and moments in place."""
  import re
  entry = compiled.as_text().split("\nENTRY ", 1)[1]
  arguments = {s for s in re.findall(r"= (\w+\[[\d,]*\])\S* parameter\(", entry) if "," in s}
  return [s for s in re.findall(r"= (\w+\[[\d,]*\])\S* copy\(", entry) if s in arguments]


def synthetic_batch(seed: int, batch: int = BATCH, seq: int = SEQ, pred: int = PRED):
  """A plausible MLM+NSP batch with padding and some unused prediction slots."""
  import numpy as np

  from bert_jax.data.batch import pretraining_batch
  rs = np.random.RandomState(seed)
  lengths = rs.randint(seq // 2, seq + 1, size=batch)
  input_mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
  input_ids = rs.randint(5, VOCAB, size=(batch, seq)) * input_mask
  token_type_ids = (np.arange(seq)[None] >= (lengths // 2)[:, None]) * input_mask
  positions = np.stack([np.sort(rs.choice(np.arange(1, l), size=pred, replace=False))
                        for l in lengths]).astype(np.int32)
  n_real = rs.randint(1, pred + 1, size=batch)
  weights = (np.arange(pred)[None] < n_real[:, None]).astype(np.float32)
  positions = positions * (weights > 0)
  ids = np.take_along_axis(input_ids, positions, 1) * (weights > 0)
  return pretraining_batch(dict(
      input_ids=input_ids, attention_mask=input_mask, token_type_ids=token_type_ids,
      masked_lm_positions=positions, masked_lm_ids=ids, masked_lm_weights=weights,
      next_sentence_label=rs.randint(0, 2, size=batch)))


def run_steps(mesh, steps: int, dropout: float, rows=None, grad_accum: int = 1):
  """Trains `steps` steps from seed 0 on `mesh`; rows=(lo, hi) feeds only those rows of each
  global batch from this process (multi-process). Returns the losses. The step is built as
  `bert-jax pretrain` builds it (model.remat auto: compiled ahead of time to choose)."""
  import jax
  from bert_jax.training.phases import make_phases
  from bert_jax.training import sharding, steps as steps_lib
  cfg = make_cfg()
  model_config = tiny_model_config(dropout)
  phases = make_phases(cfg)
  pretraining = steps_lib.Pretraining(model_config, cfg, mesh, phases, auto_remat=True)
  state = pretraining.init_state(jax.random.PRNGKey(0))
  train_step = pretraining.train_step(dataclasses.replace(phases[0], grad_accum=grad_accum))
  assert pretraining.remat(phases[0]) is False  # a tiny step fits
  losses = []
  for s in range(steps):
    host = synthetic_batch(100 + s)
    if rows is not None:
      host = {k: v[rows[0]:rows[1]] for k, v in host.items()}
    state, metrics = train_step(state, sharding.global_batch(host, mesh), jax.random.PRNGKey(7))
    losses.append(float(metrics["loss"]))
  return losses


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--meshes", default="8,1,1;2,4,1;2,2,2;1,1,1")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--dropout", type=float, default=0.1)
  ap.add_argument("--coordinator", default="")
  ap.add_argument("--num-processes", type=int, default=1)
  ap.add_argument("--process-id", type=int, default=0)
  args = ap.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  from bert_jax.training import sharding
  if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  for spec in args.meshes.split(";"):
    data, fsdp, tensor = (int(x) for x in spec.split(","))
    n = data * fsdp * tensor
    mesh = sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[:n])
    rows = None
    if args.num_processes > 1:
      per = BATCH // args.num_processes
      rows = (args.process_id * per, (args.process_id + 1) * per)
    losses = run_steps(mesh, args.steps, args.dropout, rows)
    print(json.dumps(dict(mesh=spec, losses=losses,
                          process=jax.process_index())), flush=True)


if __name__ == "__main__":
  main()
