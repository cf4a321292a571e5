"""Pretraining train-step throughput: bert-jax's jitted step vs transformers' PyTorch BERT.

  python tools/bench_pretrain.py --preset mini --seq-len 128 --batch-size 32
  python tools/bench_pretrain.py --preset base --seq-len 512 --batch-size 2 --rounds 2
  python tools/bench_pretrain.py --side jax --preset large --batch-size 64 --dtype bfloat16 \
      --attention xla --json-out case.json     # one case, unfused attention (GPU/TPU)

Both sides train on the same synthetic shapes: B sequences of T tokens (all real, two segments),
P masked positions per sequence, NSP labels; dropout on (train mode), an AdamW update per step.
- bert-jax: `bert_jax.training.steps` train_step (MLM logits only at the P gathered positions), jitted
  with its shardings on a one-device mesh, state donated.
- transformers: BertForPreTraining in train mode, labels -100 except at the masked positions,
  torch.optim.AdamW; its MLM head runs at every position (that is how the model is written).
Each side runs in its own subprocess so its peak RSS (ru_maxrss) is its own; --rounds N
alternates the sides N times and keeps each side's best round (the machine may be shared).
bert-jax runs with the huge-page malloc its `pretrain` command sets (bert_jax.devices.hostmem;
--plain-malloc to leave it out), transformers with the environment as it is.
MFU = model FLOPs of the useful work (bert_jax.devices.mfu: 6 x matmul params per token, MLM head at
the P predicted positions, plus attention) x sequences/s / peak FLOP/s of one device (on CPU
the measured float32 matmul rate). --profile-steps N adds where the device's time goes
(tools/kernel_profile.py). Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DEFAULT_PREDICTIONS = {128: 20, 512: 80}


def default_predictions(seq_len: int) -> int:
  return DEFAULT_PREDICTIONS.get(seq_len, max(1, round(seq_len * 0.15)))


def synthetic_batch(batch_size: int, seq_len: int, predictions: int, vocab_size: int,
                    seed: int = 0) -> dict:
  """A full-length two-segment batch in the create-data/pipeline layout (numpy int32)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, vocab_size, size=(batch_size, seq_len), dtype=np.int32)
  ids[:, 0], ids[:, seq_len // 2], ids[:, -1] = 101, 102, 102  # [CLS] A [SEP] B [SEP]
  segments = np.zeros((batch_size, seq_len), np.int32)
  segments[:, seq_len // 2 + 1:] = 1
  candidates = [p for p in range(1, seq_len - 1) if p != seq_len // 2]
  positions = np.stack([np.sort(rng.choice(candidates, predictions, replace=False))
                        for _ in range(batch_size)]).astype(np.int32)
  labels = np.take_along_axis(ids, positions, axis=1).copy()
  np.put_along_axis(ids, positions, 103, axis=1)  # [MASK]
  return dict(input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=segments,
              masked_lm_positions=positions, masked_lm_ids=labels,
              masked_lm_weights=np.ones((batch_size, predictions), np.float32),
              next_sentence_label=rng.integers(0, 2, size=(batch_size, 1), dtype=np.int32))


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _time_steps(step, steps: int, warmup: int) -> tuple[float, float]:
  """(compile+first-steps seconds, seconds per step, best of the timed steps' mean)."""
  start = time.perf_counter()
  for _ in range(warmup):
    step()
  warm_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    step()
  return warm_s, (time.perf_counter() - start) / steps


# ----------------------------------------------------------------------------- bert-jax side

def bench_jax(args) -> dict:
  import jax
  import ml_collections
  import numpy as np

  from bert_jax.config import get_preset
  from bert_jax.training.phases import make_phases
  from bert_jax.training.sharding import make_mesh
  from bert_jax.training.steps import Pretraining

  from bert_jax.devices import platforms
  from bert_jax.modeling import attention
  device = jax.devices()[0]
  dtype = platforms.compute_dtype(args.dtype, device)
  model_config = get_preset(args.preset, dtype=dtype, attention=args.attention)
  if args.attention_dropout is not None:
    model_config = model_config.replace(attention_probs_dropout_prob=args.attention_dropout)
  cfg = ml_collections.ConfigDict()
  cfg.total_steps = 10_000
  cfg.phases = [dict(fraction=1.0, seq_len=args.seq_len, max_predictions=args.max_predictions,
                     batch_size=args.batch_size, grad_accum=1, data="", warmup_steps=-1,
                     learning_rate=-1.0)]
  cfg.optim = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01,
      bias_correction=False, clip_norm=1.0, warmup_steps=100, schedule="continuous",
      decay_power=1.0, end_learning_rate=0.0))
  mesh = make_mesh(data=1, devices=jax.devices()[:1])
  rng = jax.random.PRNGKey(0)
  phases = make_phases(cfg)
  pretraining = Pretraining(model_config, cfg, mesh, phases)
  state = pretraining.init_state(rng)
  train_step = pretraining.train_step(phases[0])
  host = synthetic_batch(args.batch_size, args.seq_len, args.max_predictions,
                         model_config.vocab_size)
  batch = jax.device_put(host, jax.devices()[0])
  holder = {"state": state}

  def step():
    holder["state"], metrics = train_step(holder["state"], batch, rng)
    jax.block_until_ready(metrics["loss"])

  warm_s, step_s = _time_steps(step, args.steps, args.warmup)
  out = dict(side="bert-jax", backend=jax.default_backend(), step_s=step_s, warmup_s=warm_s,
             peak_rss_mb=peak_rss_mb(), dtype=dtype, device=device.device_kind,
             attention=attention.describe(args.attention, device.platform,
                                          model_config.attention_probs_dropout_prob))
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:  # accelerators: the device's own high-water mark
    out["peak_device_memory_gb"] = stats["peak_bytes_in_use"] / 1e9
  try:
    from bert_jax.devices import mfu
    flops = mfu.train_flops_per_sequence(model_config, args.seq_len, args.max_predictions)
    out.update(flops_per_sequence=float(flops),
               peak_flops=float(mfu.peak_flops_per_device(jax.devices()[0])))
  except ImportError:
    pass
  if args.profile_steps:
    from kernel_profile import profile_steps
    out["profile"] = profile_steps(step, args.profile_steps)
  loss = float(np.asarray(train_step(holder["state"], batch, rng)[1]["loss"]))
  out["final_loss"] = loss
  return out


# ----------------------------------------------------------------------------- PyTorch side

def bench_torch(args) -> dict:
  import torch
  import transformers

  from bert_jax.config import get_preset

  c = get_preset(args.preset)
  hf_config = transformers.BertConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
      num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
      hidden_act=c.hidden_act, hidden_dropout_prob=c.hidden_dropout_prob,
      attention_probs_dropout_prob=c.attention_probs_dropout_prob,
      max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size)
  torch.manual_seed(0)
  dtype = {"bfloat16": torch.bfloat16}.get(args.dtype, torch.float32)
  model = transformers.BertForPreTraining(hf_config).to(dtype).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, eps=1e-6)
  b = synthetic_batch(args.batch_size, args.seq_len, args.max_predictions, c.vocab_size)
  input_ids = torch.from_numpy(b["input_ids"]).long()
  labels = torch.full_like(input_ids, -100)
  positions = torch.from_numpy(b["masked_lm_positions"]).long()
  labels.scatter_(1, positions, torch.from_numpy(b["masked_lm_ids"]).long())
  inputs = dict(input_ids=input_ids, attention_mask=torch.from_numpy(b["attention_mask"]).long(),
                token_type_ids=torch.from_numpy(b["token_type_ids"]).long(), labels=labels,
                next_sentence_label=torch.from_numpy(b["next_sentence_label"][:, 0]).long())
  last = {}

  def step():
    optimizer.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    last["loss"] = float(out.loss)

  warm_s, step_s = _time_steps(step, args.steps, args.warmup)
  return dict(side="transformers-pytorch", backend=f"torch {torch.__version__} "
              f"({torch.get_num_threads()} threads)", step_s=step_s, warmup_s=warm_s,
              peak_rss_mb=peak_rss_mb(), final_loss=last["loss"],
              attn_implementation=getattr(model.config, "_attn_implementation", "?"))


# ----------------------------------------------------------------------------- driver

def _child_argv(args, side: str) -> list[str]:
  return [sys.executable, os.path.abspath(__file__), "--side", side, "--preset", args.preset,
          "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
          "--max-predictions", str(args.max_predictions), "--dtype", args.dtype,
          "--steps", str(args.steps), "--warmup", str(args.warmup), "--attention",
          args.attention, "--profile-steps", str(args.profile_steps), "--json"] + (
              [] if args.attention_dropout is None
              else ["--attention-dropout", str(args.attention_dropout)])


def _child_env(args, side: str) -> dict:
  """bert-jax runs as `bert-jax pretrain` does (huge-page malloc, bert_jax.devices.hostmem); PyTorch as
  users run it (the tunable made it slightly slower when we tried it)."""
  if side == "jax" and not args.plain_malloc:
    from bert_jax.devices.hostmem import with_huge_pages
    return with_huge_pages(os.environ)
  return dict(os.environ)


def _run_child(args, side: str) -> dict | None:
  proc = subprocess.run(_child_argv(args, side), capture_output=True, text=True,
                        env=_child_env(args, side))
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode != 0 or not lines:
    print(f"[{side}] failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None
  return json.loads(lines[-1])


def _torch_available() -> bool:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError:
    return False
  return True


def _report(args, result: dict) -> dict:
  tokens = args.batch_size * args.seq_len
  result["sequences_per_s"] = args.batch_size / result["step_s"]
  result["tokens_per_s"] = tokens / result["step_s"]
  return result


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="mini", help="bert_jax.config preset (mini, base, ...)")
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--max-predictions", type=int, default=None,
                      help="masked positions per sequence (default 20 at 128, 80 at 512)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"),
                      help="compute dtype (auto: bfloat16 where the device has bfloat16 "
                           "matrix units; bert-jax side)")
  parser.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas", "splash"),
                      help="bert-jax's attention path (auto: fused where the platform has a "
                           "kernel; xla: never fused)")
  parser.add_argument("--attention-dropout", type=float, default=None,
                      help="bert-jax's attention dropout (default: the preset's 0.1; 0 is the "
                           "fast recipe, fused on GPUs and TPUs)")
  parser.add_argument("--json-out", help="also write the results (one object per side) here")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile) per side")
  parser.add_argument("--rounds", type=int, default=1, help="alternate the sides N times")
  parser.add_argument("--profile-steps", type=int, default=0,
                      help="after the timed steps, trace N more (jax.profiler) and report where "
                           "the device's time goes per kind of kernel (tools/kernel_profile.py)")
  parser.add_argument("--side", choices=("both", "jax", "torch"), default="both")
  parser.add_argument("--plain-malloc", action="store_true",
                      help="run bert-jax without the huge-page malloc its CLI uses")
  parser.add_argument("--json", action="store_true", help="(child) print one JSON line")
  args = parser.parse_args(argv)
  if args.max_predictions is None:
    args.max_predictions = default_predictions(args.seq_len)
  if args.seq_len < 8 or args.max_predictions > args.seq_len - 3:
    parser.error(f"--max-predictions {args.max_predictions} must be < --seq-len - 2")

  if args.json:  # a child: one side, in this process
    result = bench_jax(args) if args.side == "jax" else bench_torch(args)
    print(json.dumps(result))
    return 0

  sides = ["jax"] if args.side == "jax" else ["torch"] if args.side == "torch" else ["jax", "torch"]
  if "torch" in sides and not _torch_available():
    print("torch/transformers not installed: benchmarking bert-jax only")
    sides.remove("torch")
  best: dict[str, dict] = {}
  for _ in range(args.rounds):
    for side in sides:
      result = _run_child(args, side)
      if result and (side not in best or result["step_s"] < best[side]["step_s"]):
        best[side] = _report(args, result)

  print(f"preset={args.preset} seq_len={args.seq_len} batch={args.batch_size} "
        f"predictions={args.max_predictions} dtype={args.dtype} steps={args.steps} "
        f"rounds={args.rounds}"
        f"{' bert-jax malloc=plain' if args.plain_malloc else ' bert-jax malloc=hugetlb'}")
  header = f"{'side':<22}{'tokens/s':>10}{'seq/s':>9}{'step ms':>9}{'peak RSS MB':>13}{'MFU':>8}"
  print(header)
  flops, peak = best.get("jax", {}).get("flops_per_sequence"), best.get("jax", {}).get("peak_flops")
  for side in sides:
    if side not in best:
      continue
    r = best[side]
    mfu = (f"{100 * flops * r['sequences_per_s'] / peak:7.1f}%" if flops and peak else "    n/a")
    print(f"{r['side']:<22}{r['tokens_per_s']:>10.0f}{r['sequences_per_s']:>9.2f}"
          f"{1000 * r['step_s']:>9.1f}{r['peak_rss_mb']:>13.0f}{mfu:>8}")
  if flops and peak:
    print(f"model FLOPs/sequence {flops:.3e}; peak {peak:.3e} FLOP/s per device "
          f"({best['jax']['backend']})")
  if "profile" in best.get("jax", {}):
    from kernel_profile import format_summary
    print(format_summary(best["jax"]["profile"]))
  if args.json_out:
    rows = []
    for side, r in best.items():
      row = dict(r, preset=args.preset, seq_len=args.seq_len, batch_size=args.batch_size,
                 max_predictions=args.max_predictions)
      if side == "jax" and flops and peak:
        row["mfu"] = flops * r["sequences_per_s"] / peak
      rows.append(row)
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  if "jax" in best and "torch" in best:
    speed = best["jax"]["tokens_per_s"] / best["torch"]["tokens_per_s"]
    memory = best["jax"]["peak_rss_mb"] / best["torch"]["peak_rss_mb"]
    print(f"bert-jax / transformers: {speed:.2f}x tokens/s, {memory:.2f}x peak RSS")
  return 0 if best else 1


if __name__ == "__main__":
  sys.exit(main())
