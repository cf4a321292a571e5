"""A real-text 4-class sentence-pair task from WikiText-2, for benchmarks at length 128.

There is no labelled multi-class corpus on these machines, so this makes one from running
text. Articles are read with bert-jax's WikiText reader (one document per article, sentences
split, `<unk>` as [UNK]); sentences under 6 words are not used. Articles are split 80/20 at
random into train and dev, so no dev article is seen in training. Each anchor sentence A (one
in every three of an article's sentences that have a successor) gets one label in turn, with B:
  next       the sentence that follows A
  article    a sentence of the same article at least 4 sentences away
  other      a sentence of another article of the same split
  shuffled   A's own words in a random order
`next` against `article` asks for local coherence, `article` against `other` for topic, and
`shuffled` for word order: a model needs more than word overlap. Rows are
`sentence1<TAB>sentence2<TAB>label` with a header, in random order; the same seed gives the
same files. With WikiText-2's validation and test splits: about 4,000 train and 1,000 dev rows,
most of them 40-128 tokens long as pairs (so length 128 truncates some).

  python tools/make_wikitext_pairs.py OUT_DIR [--seed 0]   -> OUT_DIR/train.tsv, OUT_DIR/dev.tsv
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
LABELS = ("next", "article", "other", "shuffled")
MIN_WORDS = 6
MIN_DISTANCE = 4
ANCHOR_EVERY = 3
DEV_FRACTION = 0.2


def _articles(wikitext_dir: pathlib.Path) -> list[list[str]]:
  from bert_jax.data.corpus import iter_documents
  files = [str(wikitext_dir / n) for n in ("wiki.valid.tokens", "wiki.test.tokens")]
  articles = []
  for document in iter_documents(files, input_format="text"):
    kept = [s for s in document if len(s.split()) >= MIN_WORDS and "\t" not in s]
    if len(kept) > 2 * MIN_DISTANCE:
      articles.append(kept)
  return articles


def _rows(articles: list[list[str]], rng: np.random.Generator) -> list[tuple[str, str, str]]:
  rows = []
  turn = 0
  for index, sentences in enumerate(articles):
    for i in range(0, len(sentences) - 1, ANCHOR_EVERY):
      a = sentences[i]
      label = LABELS[turn % len(LABELS)]
      turn += 1
      if label == "next":
        b = sentences[i + 1]
      elif label == "article":
        far = [j for j in range(len(sentences)) if abs(j - i) >= MIN_DISTANCE]
        b = sentences[far[rng.integers(len(far))]]
      elif label == "other":
        other = (index + 1 + rng.integers(len(articles) - 1)) % len(articles)
        b = articles[other][rng.integers(len(articles[other]))]
      else:
        words = a.split()
        b = " ".join(words[k] for k in rng.permutation(len(words)))
      rows.append((a, b, label))
  return [rows[k] for k in rng.permutation(len(rows))]


def build(out_dir: str | os.PathLike, seed: int = 0,
          wikitext_dir: str | os.PathLike = DEFAULT_WIKITEXT) -> dict[str, int]:
  """Writes OUT_DIR/train.tsv and dev.tsv; returns their row counts."""
  rng = np.random.default_rng(seed)
  articles = _articles(pathlib.Path(wikitext_dir))
  order = rng.permutation(len(articles))
  n_dev = max(2, int(round(DEV_FRACTION * len(articles))))
  splits = {"dev": [articles[k] for k in order[:n_dev]],
            "train": [articles[k] for k in order[n_dev:]]}
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  counts = {}
  for name, part in splits.items():
    rows = _rows(part, rng)
    lines = ["sentence1\tsentence2\tlabel"] + ["\t".join(r) for r in rows]
    (out / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    counts[name] = len(rows)
  return counts


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("out_dir")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--wikitext", default=str(DEFAULT_WIKITEXT),
                 help="folder with wiki.valid.tokens and wiki.test.tokens")
  args = p.parse_args()
  if not (pathlib.Path(args.wikitext) / "wiki.valid.tokens").is_file():
    print(f"error: --wikitext {args.wikitext}: no wiki.valid.tokens there", file=sys.stderr)
    return 2
  counts = build(args.out_dir, args.seed, args.wikitext)
  print(f"{args.out_dir}: train.tsv {counts['train']} rows, dev.tsv {counts['dev']} rows")
  return 0


if __name__ == "__main__":
  sys.exit(main())
