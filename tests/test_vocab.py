"""train-vocab: specials first, same ids as transformers, few [UNK]s on held-out text, CLI errors."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest

from bert_jax.data.corpus import iter_documents
from bert_jax.tokenizer import SPECIAL_TOKENS, load_tokenizer
from bert_jax.vocab import count_words, main, train_vocab

transformers = pytest.importorskip("transformers")


def _hf_ids(vocab_path, lower_case, texts):
  hf = transformers.BertTokenizerFast(vocab=str(vocab_path), do_lower_case=lower_case)
  return hf(list(texts), add_special_tokens=False)["input_ids"]


def _unk_rate(tok, texts):
  ids = tok.encode_batch(texts)
  total = sum(map(len, ids))
  return sum(i == tok.unk_id for row in ids for i in row) / total


def _write_bert_format(path, documents):
  path.write_text("\n\n".join("\n".join(d) for d in documents) + "\n", encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def sample_vocab(tmp_path_factory):
  output = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  return train_vocab("sample:en", 2000, str(output))


def test_layout_specials_first_and_unique(sample_vocab):
  lines = open(sample_vocab, encoding="utf-8").read().split("\n")
  assert lines[-1] == ""  # newline-terminated
  tokens = lines[:-1]
  assert len(tokens) == 2000 and len(set(tokens)) == 2000
  assert tuple(tokens[:5]) == SPECIAL_TOKENS  # [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4
  assert all(t and t == t.strip() for t in tokens)
  assert sum(t.startswith("##") for t in tokens) > 100  # continuation pieces exist
  tok = load_tokenizer(sample_vocab)
  assert tok.lower_case is True and (tok.pad_id, tok.unk_id, tok.mask_id) == (0, 1, 4)
  assert not any(any(c.isupper() for c in t) for t in tokens[5:])
  assert os.listdir(os.path.dirname(sample_vocab)) == ["vocab.txt"]  # no temp file left


def test_sample_tokenises_like_transformers_almost_without_unk(sample_vocab):
  sentences = [s for d in iter_documents("sample:en") for s in d]
  tok = load_tokenizer(sample_vocab)
  ours = tok.encode_batch(sentences)
  assert ours == _hf_ids(sample_vocab, True, sentences)
  assert _unk_rate(tok, sentences) < 0.0005  # only words with a character seen once
  # words are mostly whole pieces: the vocab learnt real words, not just characters
  words = sum(len(s.split()) for s in sentences)
  assert sum(map(len, ours)) < 1.6 * words


def test_every_frequent_character_is_covered(sample_vocab):
  vocab = set(open(sample_vocab, encoding="utf-8").read().split("\n"))
  words = count_words((s for d in iter_documents("sample:en") for s in d), lower_case=True)
  counts = collections.Counter()
  for word, count in words.items():
    for char in word:
      counts[char] += count
  for char, count in counts.items():
    if count >= 2:
      assert char in vocab, char
      if char.isalnum():
        assert "##" + char in vocab, char


def test_held_out_english_has_few_unks(tmp_path):
  documents = list(iter_documents("sample:en"))
  train = _write_bert_format(tmp_path / "train.txt", documents[:50])
  held_out = [s for d in documents[50:] for s in d]
  vocab = train_vocab(train, 1500, str(tmp_path / "vocab.txt"))
  tok = load_tokenizer(vocab)
  assert _unk_rate(tok, held_out) < 0.005
  assert tok.encode_batch(held_out) == _hf_ids(vocab, True, held_out)


def test_held_out_chinese_has_few_unks(shared_data, tmp_path):
  def contexts(name):
    data = json.loads((shared_data / "cmrc2018" / name).read_text(encoding="utf-8"))
    return [p["context"] for a in data["data"] for p in a["paragraphs"]]

  train = tmp_path / "zh_train.txt"
  train.write_text("\n\n".join(contexts("cmrc2018_trial.json")), encoding="utf-8")
  vocab = train_vocab(str(train), 6000, str(tmp_path / "vocab.txt"), input_format="text")
  tok = load_tokenizer(vocab)
  held_out = contexts("cmrc2018_dev.json")
  assert _unk_rate(tok, held_out) < 0.03
  assert tok.encode_batch(held_out) == _hf_ids(vocab, True, held_out)
  assert tok.tokenize("我们学习中文") == list("我们学习中文")


def test_sample_zh_and_cased_vocab(tmp_path):
  zh = train_vocab("sample:zh", 1200, str(tmp_path / "zh.txt"))
  zh_sentences = [s for d in iter_documents("sample:zh") for s in d]
  tok = load_tokenizer(zh)
  assert tok.encode_batch(zh_sentences) == _hf_ids(zh, True, zh_sentences)
  assert _unk_rate(tok, zh_sentences) < 0.01

  cased = train_vocab("sample:en", 2000, str(tmp_path / "cased.txt"), lower_case=False)
  tok = load_tokenizer(cased)
  assert tok.lower_case is False  # inferred from the vocab
  en_sentences = [s for d in iter_documents("sample:en") for s in d]
  assert tok.encode_batch(en_sentences) == _hf_ids(cased, False, en_sentences)
  assert tok.tokenize("The heart") == ["The", "heart"]  # capitals kept


def test_deterministic(tmp_path):
  a = train_vocab("sample:en", 800, str(tmp_path / "a.txt"), max_sentences=300, seed=3)
  b = train_vocab("sample:en", 800, str(tmp_path / "b.txt"), max_sentences=300, seed=3)
  assert open(a, "rb").read() == open(b, "rb").read()


def test_cli(tmp_path, capsys):
  output = tmp_path / "out" / "vocab.txt"
  assert main(["--input", "sample:en", "--input", "sample:zh", "--vocab-size", "3000",
               "--output", str(output)]) == 0
  assert "wrote" in capsys.readouterr().out
  tok = load_tokenizer(output)
  assert tok.tokenize("the heart pumps blood") == ["the", "heart", "pumps", "blood"]
  assert tok.tokenize("心脏") == ["心", "脏"]

  assert main(["--input", str(tmp_path / "missing.txt"), "--vocab-size", "100",
               "--output", str(tmp_path / "v.txt")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "missing.txt" in err and err.startswith("error: ")
  assert main(["--input", "sample", "--vocab-size", "10", "--output", str(tmp_path / "v.txt")]) == 2
  assert "--vocab-size 10" in capsys.readouterr().err
  assert not (tmp_path / "v.txt").exists()


def test_cli_subprocess_missing_input(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "bert_jax.cli", "train-vocab", "--input", str(tmp_path / "nope.txt"),
       "--vocab-size", "500", "--output", str(tmp_path / "vocab.txt")],
      capture_output=True, text=True, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0 and "nope.txt" in result.stderr
  assert "Traceback" not in result.stderr


def test_sentencepiece_advice_is_in_this_commands_flags(tmp_path, capsys):
  """sentencepiece says '--character_coverage option' / 'vocab_size': its flags, not ours."""
  rare = tmp_path / "rare.txt"
  chars = [chr(0x4E00 + i) for i in range(3000)]
  rare.write_text("\n".join(" ".join(chars[(7 * k + j) % 3000] for j in range(20))
                            for k in range(200)), encoding="utf-8")
  assert main(["--input", str(rare), "--vocab-size", "64", "--output",
               str(tmp_path / "v.txt")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"error: --input {rare}: ")
  assert "--vocab-size 64" in err and "--character-coverage" in err
  assert "character_coverage" not in err and "vocab_size" not in err and ".cc(" not in err
  assert not (tmp_path / "v.txt").exists()


def test_unwritable_output_is_refused_before_reading(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  for output, reason in ((blocker / "vocab.txt", f"{blocker} is a file, not a directory"),
                         (tmp_path, "is a directory; expected a file name"),
                         ("/proc/bert-jax/vocab.txt", "cannot write in /proc")):
    assert main(["--input", "sample", "--vocab-size", "100", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--output {output}: {reason}" in err, err


def test_special_tokens_in_the_text_are_not_learned_as_words():
  """WikiText's <unk> is read as [UNK] (the tokenizer's special token), not as `unk`."""
  counts = count_words(["The [UNK] sat on [MASK] mat .", "a [UNK] day"], lower_case=True)
  assert counts["the"] == 1 and not {"unk", "[", "]", "mask"} & set(counts)


def test_a_runs_vocab_size_counts_blank_tokens_as_the_tokenizer_does(tmp_path, shared_data):
  """bert-base-chinese's vocab has an empty token (id 343): pretraining sizes the model by
  the tokenizer's count, not by the non-blank lines."""
  from bert_jax.pretraining.workdir import count_lines
  from bert_jax.tokenizer import read_vocab_lines
  vocab = shared_data / "vocab" / "bert-base-chinese-vocab.txt"
  assert count_lines(str(vocab)) == len(read_vocab_lines(vocab)) == 21128
  crlf = tmp_path / "vocab.txt"
  crlf.write_bytes(b"[PAD]\r\n\r\n[UNK]\r\n")
  assert count_lines(str(crlf)) == len(read_vocab_lines(crlf)) == 3
