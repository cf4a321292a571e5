"""Benchmark: QA featurisation (bert_jax.finetune.qa.featurize) against transformers' own,
the fast-tokenizer preprocessing of its run_qa.py example (question + context with
truncation="only_second", overflowing windows `doc_stride` apart, offset mappings), on the
same SQuAD-layout files (default: CMRC 2018 trial and dev from ../shared/data, with the
bert-base-chinese vocab there). --against DIR also times the featurize of another checkout
(e.g. a `git worktree` of an older commit) and checks that its features are identical.

  python tools/bench_qa_features.py [--file F.json ...] [--vocab V] [--max-seq-length 384
                                     --doc-stride 128] [--against DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import statistics
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from bert_jax.finetune import qa  # noqa: E402
from bert_jax.tokenizer import load_tokenizer  # noqa: E402

ARRAYS = ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions",
          "example_index", "token_to_char", "token_is_max_context", "answer_lengths")


def other_featurize(checkout: str):
  """featurize from another checkout's bert_jax/finetune/qa.py (its own imports resolve here)."""
  path = pathlib.Path(checkout) / "bert_jax" / "finetune" / "qa.py"
  spec = importlib.util.spec_from_file_location("other_qa", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["other_qa"] = module
  spec.loader.exec_module(module)
  return module.featurize


def hf_features(hf, examples, max_len: int, stride: int, max_query: int):
  """What transformers' run_qa.py does to prepare validation features."""
  questions = [e.question for e in examples]
  contexts = [e.context for e in examples]
  enc = hf(questions, contexts, truncation="only_second", max_length=max_len, stride=stride,
           return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
  return len(enc["input_ids"])


def timed(fn, repeat: int) -> tuple[float, object]:
  times, out = [], None
  for _ in range(repeat):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--file", action="append", default=[])
  p.add_argument("--vocab", default=str(SHARED / "vocab" / "bert-base-chinese-vocab.txt"))
  p.add_argument("--max-seq-length", type=int, default=384)
  p.add_argument("--doc-stride", type=int, default=128)
  p.add_argument("--max-query-length", type=int, default=64)
  p.add_argument("--against", help="another checkout whose featurize to time and compare")
  p.add_argument("--repeat", type=int, default=3, help="runs of each (median reported)")
  args = p.parse_args()
  files = args.file or [str(SHARED / "cmrc2018" / n)
                        for n in ("cmrc2018_trial.json", "cmrc2018_dev.json")]
  import transformers
  tok = load_tokenizer(args.vocab)
  hf = transformers.BertTokenizerFast(args.vocab, do_lower_case=tok.lower_case)
  other = other_featurize(args.against) if args.against else None
  kw = dict(max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
            max_query_length=args.max_query_length, is_training=False)
  print(f"max length {args.max_seq_length}, doc stride {args.doc_stride}; {os.cpu_count()} "
        f"CPUs; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"median of {args.repeat}")
  for path in files:
    examples = qa.read_squad(path)
    ours_s, ours = timed(lambda: qa.featurize(examples, tok, **kw), args.repeat)
    line = (f"  {pathlib.Path(path).name}: {len(examples)} questions, {len(ours)} rows  "
            f"bert-jax {ours_s:.3f}s")
    # run_qa passes doc_stride as the tokenizer's overlap, which must be shorter than every
    # window's room for context (the tokenizer panics otherwise): then there is no peer to time.
    longest_question = max(len(ids) for ids in hf([e.question for e in examples])["input_ids"])
    if args.doc_stride < args.max_seq_length - longest_question - 1:
      hf_s, hf_rows = timed(lambda: hf_features(hf, examples, args.max_seq_length,
                                                args.doc_stride, args.max_query_length),
                            args.repeat)
      line += f"  transformers run_qa {hf_s:.3f}s ({hf_rows} rows) = {hf_s / ours_s:.1f}x"
    else:
      line += "  transformers run_qa: n/a (its doc stride, an overlap, leaves no room)"
    if other:
      other_s, theirs = timed(lambda: other(examples, tok, **kw), args.repeat)
      same = all(np.array_equal(getattr(ours, k), getattr(theirs, k)) for k in ARRAYS)
      line += f"  {args.against} {other_s:.3f}s = {other_s / ours_s:.1f}x, " + (
          "identical features" if same else "FEATURES DIFFER")
    print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
