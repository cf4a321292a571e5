"""NSP pair construction on synthetic documents whose token ids say where they came from."""

from __future__ import annotations

import random

import numpy as np
import pytest

from bert_jax.data import instances

CLS, SEP = 2, 3


def _naive_trim(len_a, len_b, max_tokens):
  while len_a + len_b > max_tokens:
    if len_a > len_b:
      len_a -= 1
    else:
      len_b -= 1
  return len_a, len_b


def test_trim_pair_matches_one_token_at_a_time():
  for len_a in range(0, 40):
    for len_b in range(0, 40):
      for max_tokens in (5, 17, 30, 125):
        assert instances.trim_pair(len_a, len_b, max_tokens) == _naive_trim(len_a, len_b, max_tokens)


def _docs(rng, num_docs, sentences=(1, 12), words=(3, 40)):
  """Token id = 1000 * (doc + 1) + running index inside the doc: contiguity is checkable."""
  docs = []
  for d in range(num_docs):
    n = 0
    doc = []
    for _ in range(rng.integers(*sentences)):
      k = int(rng.integers(*words))
      doc.append(list(range(1000 * (d + 1) + n, 1000 * (d + 1) + n + k)))
      n += k
    docs.append(doc)
  return docs


def _check_pairs(chunk, spans, max_seq_length):
  doc_of = chunk.ids // 1000
  for a0, a1, b0, b1, rnd in zip(*spans):
    assert 1 <= a1 - a0 and 1 <= b1 - b0
    assert (a1 - a0) + (b1 - b0) <= max_seq_length - 3
    a, b = chunk.ids[a0:a1], chunk.ids[b0:b1]
    assert np.all(np.diff(a) == 1) and np.all(np.diff(b) == 1)     # contiguous text
    if not rnd:
      assert doc_of[a0] == doc_of[b0] and b0 >= a1                   # the actual next text


def test_pairs_are_contiguous_fit_and_half_random():
  rng = np.random.default_rng(0)
  chunk = instances.build_chunk(_docs(rng, 60))
  spans = instances.chunk_pairs(chunk, random.Random(1), max_seq_length=64, short_seq_prob=0.1,
                                dupe_factor=3)
  _check_pairs(chunk, spans, 64)
  assert len(spans.a_start) > 300
  assert 0.4 < spans.is_random_next.mean() < 0.65
  doc_of = chunk.ids // 1000
  rnd = spans.is_random_next == 1
  other = doc_of[spans.a_start[rnd]] != doc_of[spans.b_start[rnd]]
  assert other.all()


def test_unused_sentences_are_put_back():
  """A random B leaves the real B's sentences to start the next segment: with no trimming,
  each A starts where the previous instance's own text ended, and the pass covers the doc."""
  rng = np.random.default_rng(5)
  docs = _docs(rng, 2, sentences=(30, 31), words=(2, 6))
  chunk = instances.build_chunk(docs)
  seen_random = seen_real = 0
  for seed in range(5):
    out = []
    instances.document_pairs(chunk, 0, random.Random(seed), max_seq_length=1000, short_seq_prob=0.0,
                             out=out)
    expected_start = 0
    for a0, a1, b0, b1, rnd in out:
      assert a0 == expected_start
      expected_start = a1 if rnd else b1
      seen_random += rnd
      seen_real += 1 - rnd
    assert expected_start == chunk.sentence_bounds[0][-1]
  assert seen_random and seen_real


def test_one_sentence_documents_always_random_next():
  docs = [[[100 * d + k for k in range(5)]] for d in range(10)]
  chunk = instances.build_chunk(docs)
  spans = instances.chunk_pairs(chunk, random.Random(0), max_seq_length=32, short_seq_prob=0.0,
                                dupe_factor=2)
  assert len(spans.a_start) == 20 and spans.is_random_next.all()


def test_single_document_chunk_and_long_sentence_are_handled():
  chunk = instances.build_chunk([[list(range(5000)), [7, 8, 9]]])
  spans = instances.chunk_pairs(chunk, random.Random(3), max_seq_length=16, short_seq_prob=0.0,
                                dupe_factor=4)
  for a0, a1, b0, b1, _ in zip(*spans):
    assert a1 - a0 >= 1 and b1 - b0 >= 1 and (a1 - a0) + (b1 - b0) <= 13


def test_empty_sentences_and_documents_drop_out():
  chunk = instances.build_chunk([[[], [5, 6]], [[], []], [[7]]])
  assert chunk.sentence_bounds == [[0, 2], [2, 3]]
  np.testing.assert_array_equal(chunk.ids, [5, 6, 7])


def test_trim_removes_from_both_ends():
  chunk = instances.build_chunk([[list(range(1000, 1200))], [list(range(2000, 2200))]])
  fronts = set()
  for seed in range(20):
    spans = instances.chunk_pairs(chunk, random.Random(seed), max_seq_length=20,
                                  short_seq_prob=0.0, dupe_factor=1)
    fronts.update((chunk.ids[spans.a_start] % 1000).tolist())
  assert min(fronts) > 0 and max(fronts) < 190   # neither always the front nor the back


@pytest.mark.parametrize("seed", [0, 1])
def test_assemble_layout(seed):
  rng = np.random.default_rng(seed)
  chunk = instances.build_chunk(_docs(rng, 20))
  spans = instances.chunk_pairs(chunk, random.Random(seed), max_seq_length=48,
                                short_seq_prob=0.2, dupe_factor=1)
  rows = instances.assemble(chunk, spans, cls_id=CLS, sep_id=SEP)
  for n in range(len(rows.lengths)):
    la, length = rows.len_a[n], rows.lengths[n]
    row = rows.ids_NL[n]
    assert row[0] == CLS and row[la + 1] == SEP and row[length - 1] == SEP
    np.testing.assert_array_equal(row[1:la + 1], chunk.ids[spans.a_start[n]:spans.a_end[n]])
    np.testing.assert_array_equal(row[la + 2:length - 1], chunk.ids[spans.b_start[n]:spans.b_end[n]])
    assert not row[length:].any()
    assert rows.maskable_NL[n].sum() == length - 3
    assert not rows.maskable_NL[n, [0, la + 1, length - 1]].any()
