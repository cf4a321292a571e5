"""Hugging Face's MLM recipe on WikiText-2, side by side: bert-jax vs transformers' PyTorch.

  python tools/bench_mlm_recipe.py --workdir /tmp/mlm_recipe            # defaults below
  python tools/bench_mlm_recipe.py --workdir DIR --steps 600 --layers 4 --hidden 256

The recipe (transformers' examples/pytorch/language-modeling/run_mlm.py): masked-LM only,
mlm_probability 0.2, text grouped into full blocks, AdamW with linear warmup and decay,
perplexity = exp(eval loss). Both sides get the same:
- text: ../shared/data/wikitext-2 holds only wiki.valid.tokens and wiki.test.tokens, so the
  models TRAIN ON wiki.test.tokens (the larger) and EVALUATE ON wiki.valid.tokens;
- vocab: a WordPiece vocab trained on the training text (bert_jax.vocab, --vocab-size);
- sequences: `create-data --objective mlm` rows ([CLS] + seq_len - 2 tokens of contiguous
  text + [SEP], [SEP] between documents), stored unmasked; PyTorch reads the same rows in
  the same order as bert-jax's pipeline (its RecordOrder) and evaluates on the same rows;
- masking: dynamic, 20% (bert-jax: round(0.2 x maskable) per row, up to --max-predictions;
  DataCollatorForLanguageModeling: each token with probability 0.2), 80/10/10;
- model: a BERT of --layers x --hidden (heads hidden/64 or 2, FFN 4 x hidden), dropout 0.1;
- optimisation: batch, steps, learning rate, warmup, linear decay from the peak, weight decay
  0.01 (not on biases and LayerNorm), bias-corrected Adam with eps 1e-6, clipping at 1.0.
bert-jax runs `bert-jax pretrain --config configs/tiny_cpu.py` with overrides (objective mlm);
PyTorch a plain loop over BertForMaskedLM + DataCollatorForLanguageModeling + torch.optim.AdamW
(+ get_linear_schedule_with_warmup: what Trainer does, without its bookkeeping). The masks
differ (two random generators), so the curves agree statistically, not digit for digit.

Printed: both eval perplexity curves, and the wall-time ratio bert-jax / PyTorch of the whole
training run (bert-jax's includes its process start, checks and compile) and of the steady
step time (medians; bert-jax's from its metrics rows, PyTorch's timed per step). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"


def prepare(args) -> tuple[str, str, dict]:
  """vocab.txt and one create-data directory: train split from --train, eval from --eval."""
  from bert_jax.data import create, records
  from bert_jax.vocab import train_vocab
  work = pathlib.Path(args.workdir)
  vocab = work / "vocab.txt"
  if not vocab.exists():
    train_vocab([args.train], args.vocab_size, str(vocab))
  data = work / "data"
  if not (data / records.MANIFEST).exists():
    common = dict(objective="mlm", max_seq_length=args.seq_len,
                  max_predictions_per_seq=args.max_predictions, masked_lm_prob=0.2,
                  dupe_factor=1, static_masking=False, progress=False, seed=args.seed)
    create.create_data([args.eval], str(vocab), str(work / "eval_data"), **common)
    man = create.create_data([args.train], str(vocab), str(work / "train_data"), **common)
    held = records.read_manifest(work / "eval_data")["splits"]["train"]
    names = [records.shard_name("eval", i, len(held["shards"])) for i in range(len(held["shards"]))]
    for old, new in zip(held["shards"], names):
      shutil.move(str(work / "eval_data" / old), str(work / "train_data" / new))
    man["splits"]["eval"] = dict(held, shards=names)
    man["inputs"] += [args.eval]
    (work / "train_data" / records.MANIFEST).write_text(json.dumps(man, indent=1))
    shutil.rmtree(work / "eval_data")
    (work / "train_data").rename(data)
  return str(vocab), str(data), records.read_manifest(data)


def model_fields(args, vocab_size: int) -> dict:
  heads = max(2, args.hidden // 64)
  return dict(vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
              num_attention_heads=heads, intermediate_size=4 * args.hidden,
              max_position_embeddings=max(128, args.seq_len))


def run_bert_jax(args, vocab: str, data: str, fields: dict) -> dict:
  workdir = pathlib.Path(args.workdir) / "bert_jax_run"
  shutil.rmtree(workdir, ignore_errors=True)
  phase = dict(fraction=1.0, seq_len=args.seq_len, max_predictions=args.max_predictions,
               batch_size=args.batch_size, data=data)
  cmd = [sys.executable, "-m", "bert_jax.cli", "pretrain", "--config",
         str(REPO / "configs" / "tiny_cpu.py"), "--workdir", str(workdir),
         "--config.objective=mlm", f"--config.total_steps={args.steps}",
         f"--config.phases={json.dumps([phase])}", f"--config.data.vocab={vocab}",
         "--config.data.masked_lm_prob=0.2", "--config.data.dynamic_masking=true",
         "--config.data.worker_count=0", "--config.model.dtype=float32",
         f"--config.optim.learning_rate={args.lr}", f"--config.optim.warmup_steps={args.warmup}",
         "--config.optim.decay_from=warmup_end", "--config.optim.bias_correction=true",
         "--config.optim.eps=1e-6", "--config.optim.weight_decay=0.01",
         f"--config.eval_every={args.eval_every}", f"--config.eval_batches={args.eval_batches}",
         f"--config.log_every={args.eval_every}", f"--config.checkpoint.every_steps={args.steps}",
         f"--config.seed={args.seed}"]
  cmd += [f"--config.model.overrides.{k}={v}" for k, v in fields.items()]
  started = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  wall = time.perf_counter() - started
  if proc.returncode:
    sys.exit(f"bert-jax pretrain failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["split"] == "train" and r.get("steps_per_sec")]
  return dict(wall_s=wall, step_s=statistics.median(1 / r["steps_per_sec"] for r in train),
              curve=[(r["step"], r["mlm_perplexity"]) for r in rows if r["split"] == "eval"])


def run_pytorch(args, vocab: str, data: str, man: dict, fields: dict) -> dict:
  import numpy as np
  import torch
  import transformers
  from bert_jax.data import read_instances
  from bert_jax.data.pipeline import RecordOrder
  torch.manual_seed(args.seed)
  torch.set_num_threads(len(os.sched_getaffinity(0)))   # the cores this process may use
  tok = transformers.BertTokenizerFast(vocab_file=vocab, do_lower_case=True)
  collate = transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.2)
  train_rows = [r["input_ids"] for r in read_instances(data, "train")]
  eval_rows = [r["input_ids"] for r in read_instances(data, "eval")]
  B = args.batch_size
  eval_rows = eval_rows[:min(args.eval_batches, len(eval_rows) // B) * B]   # bert-jax's

  def batch_of(rows_):
    return collate([{"input_ids": torch.tensor(r, dtype=torch.long),
                     "attention_mask": torch.ones(len(r), dtype=torch.long)} for r in rows_])

  gen_state = torch.random.get_rng_state()
  torch.manual_seed(args.seed + 1)            # fixed eval masks, as bert-jax's cached batches
  eval_batches = [batch_of(eval_rows[i:i + B]) for i in range(0, len(eval_rows), B)]
  torch.random.set_rng_state(gen_state)
  config = transformers.BertConfig(**fields, hidden_dropout_prob=0.1,
                                   attention_probs_dropout_prob=0.1)
  model = transformers.BertForMaskedLM(config)
  no_decay = ("bias", "LayerNorm.weight")
  groups = [dict(params=[p for n, p in model.named_parameters() if not n.endswith(no_decay)],
                 weight_decay=0.01),
            dict(params=[p for n, p in model.named_parameters() if n.endswith(no_decay)],
                 weight_decay=0.0)]
  optimizer = torch.optim.AdamW(groups, lr=args.lr, eps=1e-6)
  scheduler = transformers.get_linear_schedule_with_warmup(optimizer, args.warmup, args.steps)
  order = RecordOrder(len(train_rows), 0, 1, True, args.seed)   # bert-jax's phase-0 stream

  def evaluate() -> float:
    model.eval()
    total = count = 0.0
    with torch.no_grad():
      for b in eval_batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        total += float(torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100, reduction="sum"))
        count += float((b["labels"] != -100).sum())
    model.train()
    return float(np.exp(total / count))

  curve, step_times = [], []
  model.train()
  started = time.perf_counter()
  for step in range(args.steps):
    t0 = time.perf_counter()
    keys = order.keys(np.arange(step * B, (step + 1) * B, dtype=np.int64))
    batch = batch_of([train_rows[k] for k in keys])
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    step_times.append(time.perf_counter() - t0)
    if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
      curve.append((step + 1, evaluate()))
  return dict(wall_s=time.perf_counter() - started, step_s=statistics.median(step_times[5:]),
              curve=curve)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="vocab, data and the bert-jax run (reused)")
  p.add_argument("--train", default=str(WIKITEXT / "wiki.test.tokens"))
  p.add_argument("--eval", default=str(WIKITEXT / "wiki.valid.tokens"))
  p.add_argument("--vocab-size", type=int, default=8000)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--max-predictions", type=int, default=26, help="bert-jax's cap (0.2 x 126)")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--warmup", type=int, default=40)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--side", choices=("both", "jax", "torch"), default="both")
  args = p.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  vocab, data, man = prepare(args)
  fields = model_fields(args, man["vocab"]["size"])
  print(f"train {args.train} ({man['splits']['train']['num_instances']} rows of {args.seq_len}),"
        f" eval {args.eval} (first {args.eval_batches} batches), model {fields}, batch "
        f"{args.batch_size}, {args.steps} steps, lr {args.lr}, warmup {args.warmup}", flush=True)
  results = {}
  if args.side in ("both", "jax"):
    results["bert-jax"] = run_bert_jax(args, vocab, data, fields)
  if args.side in ("both", "torch"):
    results["pytorch"] = run_pytorch(args, vocab, data, man, fields)
  steps = sorted({s for r in results.values() for s, _ in r["curve"]})
  print("step  " + "  ".join(f"{name:>12}" for name in results) + "   (eval mlm perplexity)")
  for s in steps:
    print(f"{s:>4}  " + "  ".join(f"{dict(r['curve']).get(s, float('nan')):12.2f}"
                                  for r in results.values()))
  for name, r in results.items():
    print(f"{name}: whole run {r['wall_s']:.1f} s, median step {r['step_s'] * 1000:.1f} ms")
  if len(results) == 2:
    jx, pt = results["bert-jax"], results["pytorch"]
    print(f"wall-time ratio bert-jax / PyTorch: whole run {jx['wall_s'] / pt['wall_s']:.2f}, "
          f"steady step {jx['step_s'] / pt['step_s']:.2f}")
  print(json.dumps({k: dict(v, curve=[list(c) for c in v["curve"]]) for k, v in
                    results.items()}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
