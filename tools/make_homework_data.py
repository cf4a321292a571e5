"""CMRC 2018 rewritten in the Chinese reading-comprehension homework's layout, CPU-sized, plus
a pretraining corpus of the training paragraphs (for tools/homework_cpu_run.sh).

  python tools/make_homework_data.py --train-source cmrc2018_dev.json \
      --valid-source cmrc2018_trial.json --output DIR [--train-questions 1200 \
      --valid-questions 300 --seed 0]

Writes DIR/context.json (every paragraph used), train.json and valid.json (four paragraphs per
question, one relevant, `answer` {text, start} as the source gives them), test.json (valid's
questions without `relevant` and `answer`) and corpus.txt (the training paragraphs, one
sentence a line, a blank line between paragraphs). The two sources hold different articles, so
the valid questions' relevant paragraphs AND their distractors come from paragraphs that no
training question sees: selection is measured on held-out paragraphs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np


def questions(path: str) -> list[tuple[str, dict]]:
  """(context, question) pairs of a SQuAD-layout file, in file order."""
  with open(path, encoding="utf-8") as f:
    data = json.load(f)["data"]
  return [(p["context"], q) for a in data for p in a["paragraphs"] for q in p["qas"]]


def to_layout(pairs: list[tuple[str, dict]], contexts: list[str], pool: list[int],
              rng: np.random.Generator) -> list[dict]:
  """Homework records: each question's relevant paragraph among three distractors drawn from
  `pool` (ids into `contexts`), at a random place."""
  index = {c: i for i, c in enumerate(contexts)}
  records = []
  for context, q in pairs:
    relevant = index[context]
    others = [p for p in rng.choice(pool, 4, replace=False).tolist() if p != relevant][:3]
    ids = others[:]
    ids.insert(int(rng.integers(4)), relevant)
    answer = q["answers"][0]
    records.append({"id": q["id"], "question": q["question"], "paragraphs": ids,
                    "relevant": relevant,
                    "answer": {"text": answer["text"], "start": answer["answer_start"]}})
  return records


def sentences(paragraph: str) -> list[str]:
  return [s for s in re.split(r"(?<=[。！？])", paragraph.replace("\n", "")) if s.strip()]


def build(train_source: str, valid_source: str, out: str, train_questions: int,
          valid_questions: int, seed: int) -> dict[str, int]:
  rng = np.random.default_rng(seed)
  train = questions(train_source)
  valid = questions(valid_source)
  train = [train[i] for i in sorted(rng.permutation(len(train))[:train_questions])]
  valid = [valid[i] for i in sorted(rng.permutation(len(valid))[:valid_questions])]
  train_ctx = list(dict.fromkeys(c for c, _ in questions(train_source)))
  valid_ctx = [c for c in dict.fromkeys(c for c, _ in questions(valid_source))
               if c not in set(train_ctx)]
  valid = [(c, q) for c, q in valid if c in set(valid_ctx)]
  contexts = train_ctx + valid_ctx
  train_pool = list(range(len(train_ctx)))
  valid_pool = list(range(len(train_ctx), len(contexts)))
  train_records = to_layout(train, contexts, train_pool, rng)
  valid_records = to_layout(valid, contexts, valid_pool, rng)
  os.makedirs(out, exist_ok=True)

  def dump(name, obj):
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
      json.dump(obj, f, ensure_ascii=False)
  dump("context.json", contexts)
  dump("train.json", train_records)
  dump("valid.json", valid_records)
  dump("test.json", [{k: r[k] for k in ("id", "question", "paragraphs")}
                     for r in valid_records])
  with open(os.path.join(out, "corpus.txt"), "w", encoding="utf-8") as f:
    f.write("\n\n".join("\n".join(sentences(c)) for c in train_ctx) + "\n")
  return {"contexts": len(contexts), "train": len(train_records), "valid": len(valid_records),
          "train_paragraphs": len(train_ctx), "valid_paragraphs": len(valid_ctx)}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--train-source", required=True, help="SQuAD-layout JSON (CMRC 2018 dev)")
  p.add_argument("--valid-source", required=True, help="SQuAD-layout JSON (CMRC 2018 trial)")
  p.add_argument("--output", required=True)
  p.add_argument("--train-questions", type=int, default=1200)
  p.add_argument("--valid-questions", type=int, default=300)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  for path in (a.train_source, a.valid_source):
    if not os.path.isfile(path):
      print(f"error: {path}: no such file", file=sys.stderr)
      return 2
  print(json.dumps(build(a.train_source, a.valid_source, a.output, a.train_questions,
                         a.valid_questions, a.seed)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
