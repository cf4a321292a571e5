"""WordPiece ids identical to transformers' BertTokenizerFast; offsets; casing; bad vocabs."""

from __future__ import annotations

import collections
import json
import pathlib
import unicodedata

import pytest

from bert_jax.errors import UserError
from bert_jax.tokenizer import (SPECIAL_TOKENS, find_lower_case, find_vocab, infer_lower_case,
                                load_tokenizer, write_tokenizer_files)

transformers = pytest.importorskip("transformers")

EDGE_CASES = [
    "Héllo Wörld, naïve café déjà vu — Ångström Ørsted Straße ﬁnance",
    "control\x00chars\x07 and\ttabs\r\nnewlines\x1b[0m \u200b zero-width \ufeffbom",
    "a" * 101 + " " + "b" * 100 + " ok " + "supercalifragilistic" * 6,
    "中文English混合text，测试BERT的tokenizer。日本語のテキストも、한국어도 OK!",
    "Punctuation!!! (parens) [brackets] {braces} \"quotes\" 'single' ... $100.00 50% #tag @user",
    "emoji 😀🎉 and math ∑∫√ and arrows → ← and symbols ©®™",
    "[MASK] [CLS] in text, [SEP]x, [mask] lower, [UNK]",
    "  leading and trailing spaces   ",
    "",
    "unbelievably tokenization-heavy hyperparameterisation",
]


def _minilm_vocab(minilm_dir):
  return minilm_dir / "vocab.txt"


def _hf(vocab_path, lower_case):
  return transformers.BertTokenizerFast(vocab=str(vocab_path), do_lower_case=lower_case)


def _hf_ids(hf, texts):
  return hf(list(texts), add_special_tokens=False)["input_ids"]


def _strip_accents_lower(text: str) -> str:
  text = unicodedata.normalize("NFD", text.lower())
  return "".join(c for c in text if unicodedata.category(c) != "Mn")


@pytest.fixture(scope="module")
def cased_vocab(tmp_path_factory, minilm_dir):
  """A cased vocab: MiniLM's uncased entries plus capitalised forms of its first words."""
  tokens = _minilm_vocab(minilm_dir).read_text(encoding="utf-8").splitlines()
  extra = []
  for token in tokens[1000:6000]:
    if token.isalpha() and token.islower():
      extra += [token.capitalize(), "##" + token.capitalize()]
  extra += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
  extra += ["##" + chr(c) for c in range(ord("A"), ord("Z") + 1)] + ["Ö", "é", "##é"]
  path = tmp_path_factory.mktemp("cased") / "vocab.txt"
  path.write_text("\n".join(tokens + extra) + "\n", encoding="utf-8")
  return path


def test_english_wikitext_ids_match_transformers(shared_data, minilm_dir):
  lines = (shared_data / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines()
  tok = load_tokenizer(_minilm_vocab(minilm_dir))
  assert tok.lower_case is True  # inferred from the vocab
  hf = _hf(_minilm_vocab(minilm_dir), True)
  ours = tok.encode_batch(lines)
  assert sum(map(len, ours)) > 200_000
  assert ours == _hf_ids(hf, lines)
  # encode and encode_batch agree
  assert [tok.encode(line) for line in lines[:300]] == ours[:300]


def test_chinese_cmrc_ids_match_transformers(shared_data):
  vocab = shared_data / "vocab" / "bert-base-chinese-vocab.txt"
  data = json.loads((shared_data / "cmrc2018" / "cmrc2018_dev.json").read_text(encoding="utf-8"))
  texts = []
  for article in data["data"]:
    for paragraph in article["paragraphs"]:
      texts.append(paragraph["context"])
      texts += [qa["question"] for qa in paragraph["qas"]]
  tok = load_tokenizer(vocab)
  assert tok.lower_case is True
  ours = tok.encode_batch(texts)
  assert ours == _hf_ids(_hf(vocab, True), texts)
  # Chinese is split per character: no '##' pieces inside a run of CJK text
  assert tok.tokenize("我们今天去北京大学") == list("我们今天去北京大学")


def test_chinese_vocab_duplicates_map_to_later_line(shared_data):
  vocab = shared_data / "vocab" / "bert-base-chinese-vocab.txt"
  tok = load_tokenizer(vocab)
  lines = vocab.read_text(encoding="utf-8").splitlines()
  assert tok.vocab_size == len(lines) == 21128
  duplicates = {t for t, n in collections.Counter(lines).items() if n > 1}
  assert len(lines) - len(set(lines)) == 53 and duplicates
  hf_vocab = _hf(vocab, True).get_vocab()
  for token in duplicates:
    last = len(lines) - 1 - lines[::-1].index(token)
    assert tok.vocab[token] == last == hf_vocab[token]
  assert tok.convert_ids_to_tokens(range(tok.vocab_size)) == lines


@pytest.mark.parametrize("lower_case", [True, False])
def test_edge_cases_match_transformers(minilm_dir, cased_vocab, lower_case):
  vocab = _minilm_vocab(minilm_dir) if lower_case else cased_vocab
  tok = load_tokenizer(vocab, lower_case=lower_case)
  hf = _hf(vocab, lower_case)
  for text in EDGE_CASES:
    assert tok.encode(text) == _hf_ids(hf, [text])[0], text
    assert tok.tokenize(text) == hf.tokenize(text), text
  # encode_batch cuts the texts into pieces that tokenise alone: the same ids
  assert tok.encode_batch(EDGE_CASES) == _hf_ids(hf, EDGE_CASES)


def test_edge_case_behaviour(minilm_dir):
  tok = load_tokenizer(_minilm_vocab(minilm_dir))
  assert tok.tokenize("Héllo Wörld") == ["hello", "world"]  # lower-cased, accents gone
  assert tok.tokenize("a\x00b\x07c") == ["abc"]  # control characters dropped
  assert tok.tokenize("x" * 101) == ["[UNK]"]  # over 100 characters
  assert tok.tokenize("x" * 100) != ["[UNK]"]
  assert tok.tokenize("abc中文def") == ["abc", "中", "文", "def"]
  assert tok.tokenize("hi!?") == ["hi", "!", "?"]
  assert tok.tokenize("unaffable")[1].startswith("##")


def test_cased_vocab_inferred_and_matches_transformers(shared_data, cased_vocab):
  tok = load_tokenizer(cased_vocab)
  assert tok.lower_case is False
  lines = (shared_data / "wikitext-2" / "wiki.test.tokens").read_text(encoding="utf-8").splitlines()
  assert tok.encode_batch(lines) == _hf_ids(_hf(cased_vocab, False), lines)
  assert tok.tokenize("The Ölfeld") != load_tokenizer(cased_vocab, lower_case=True).tokenize("The Ölfeld")


def test_infer_lower_case_rule():
  assert infer_lower_case(list(SPECIAL_TOKENS) + ["the", "##s", "café"]) is True
  assert infer_lower_case(list(SPECIAL_TOKENS) + ["the", "The", "##s", "Paris"]) is False
  assert infer_lower_case(list(SPECIAL_TOKENS) + ["中", "##文"]) is True  # nothing cased


@pytest.mark.parametrize("language", ["en", "zh"])
def test_offsets_point_at_the_token_text(shared_data, minilm_dir, language):
  if language == "en":
    vocab = _minilm_vocab(minilm_dir)
    texts = (shared_data / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines()[:400]
    texts += EDGE_CASES
  else:
    vocab = shared_data / "vocab" / "bert-base-chinese-vocab.txt"
    data = json.loads((shared_data / "cmrc2018" / "cmrc2018_trial.json").read_text(encoding="utf-8"))
    texts = [p["context"] for a in data["data"] for p in a["paragraphs"]][:50]
  tok = load_tokenizer(vocab)
  ragged = tok.encode_ragged(texts, offsets=True)  # many texts at once: the same as each alone
  checked = exact = 0
  for index, text in enumerate(texts):
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    cut = slice(ragged.splits[index], ragged.splits[index + 1])
    assert ragged.ids[cut].tolist() == ids and ragged.offsets[cut].tolist() == list(map(list, offsets))
    assert len(offsets) == len(ids)
    for token, (start, end) in zip(tok.convert_ids_to_tokens(ids), offsets):
      assert 0 <= start < end <= len(text)
      if token == "[UNK]":
        continue
      piece = token[2:] if token.startswith("##") else token
      # (a Hangul syllable decomposes into several jamo pieces, each spanning the syllable)
      assert _strip_accents_lower(piece) in _strip_accents_lower(text[start:end]), (text, token)
      exact += _strip_accents_lower(piece) == _strip_accents_lower(text[start:end])
      checked += 1
  assert checked > 1000 and exact > 0.99 * checked


# Texts around the shortcuts of encode_ragged: compatibility ideographs (they decompose), the
# Extension B and late-assigned (or unassigned) ideographs, punctuation alone between Chinese
# characters, combining marks and special tokens beside them, long words, odd whitespace.
RAGGED_EDGE_CASES = EDGE_CASES + [
    "中文，测试。（括号）「引号」……",
    "\uf900\uf901\ufa0e\ufa2d中\uf9ff",
    "\U00020000\U0002a6d6\U0002a6d7\U0002a6df\U0002a6e0\U0002b740",
    "\u9fa5\u9fa6\u9fd5\u9fff\u4db5\u4db6\u4dbf\u3400",
    "中\u0301文\u0308a\u0301\u0302 \u0301",
    "[MASK]中[SEP]文[MA中SK] 中[mask]",
    "\u3000中\u3000文\t\n中\x00文\ufffd",
    "x" * 120 + "中" + "y" * 120 + "，" + "z" * 99,
    " ",
]


@pytest.mark.parametrize("joined_chars", [1, 7, None])
@pytest.mark.parametrize("lower_case", [True, False])
def test_ragged_edge_cases_are_those_of_each_text_alone(shared_data, monkeypatch, joined_chars,
                                                        lower_case):
  """encode_ragged looks the common Chinese characters up in the vocab and sends the other
  distinct pieces to the backend joined into long texts (cut anywhere: joined_chars)."""
  from bert_jax import tokenizer as tokenizer_module
  if joined_chars:
    monkeypatch.setattr(tokenizer_module, "_JOINED_CHARS", joined_chars)
  tok = load_tokenizer(shared_data / "vocab" / "bert-base-chinese-vocab.txt", lower_case)
  texts = RAGGED_EDGE_CASES + RAGGED_EDGE_CASES[::-1]  # repeated pieces, in other orders
  ragged = tok.encode_ragged(texts, offsets=True)
  for index, text in enumerate(texts):
    ids, offsets = tok.encode_with_offsets(text)
    cut = slice(ragged.splits[index], ragged.splits[index + 1])
    assert ragged.ids[cut].tolist() == ids, text
    assert ragged.offsets[cut].tolist() == list(map(list, offsets)), text
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_plain_chinese_characters_are_their_vocab_entries(shared_data, minilm_dir):
  """What encode_ragged assumes of the characters it looks up itself: the backend makes each
  one token, its vocab entry or [UNK], spanning the character."""
  from bert_jax.tokenizer import _PLAIN_RANGES
  codes = [c for lo, hi in _PLAIN_RANGES for c in range(lo, hi + 1)]
  text = " ".join(map(chr, codes))
  for vocab in (shared_data / "vocab" / "bert-base-chinese-vocab.txt", _minilm_vocab(minilm_dir)):
    for lower_case in (True, False):
      tok = load_tokenizer(vocab, lower_case)
      ids, offsets = tok.encode_with_offsets(text)
      assert ids == [tok.vocab.get(chr(c), tok.unk_id) for c in codes]
      assert offsets == [(2 * i, 2 * i + 1) for i in range(len(codes))]


def test_decode_and_lookups(minilm_dir):
  tok = load_tokenizer(_minilm_vocab(minilm_dir))
  text = "the unaffable tokenizer runs quickly"
  ids = tok.encode(text)
  assert any(tok.is_continuation(i) for i in ids)
  assert tok.decode(ids + [tok.pad_id, tok.pad_id]) == text
  assert tok.convert_tokens_to_ids(tok.tokenize(text)) == ids
  assert tok.convert_tokens_to_ids(["not-a-token-xyz"]) == [tok.unk_id]
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
  tokens = tok.convert_ids_to_tokens(range(tok.vocab_size))
  assert tok.continuation_mask.tolist() == [t.startswith("##") and len(t) > 2 for t in tokens]
  assert tok.vocab_size == 30522 and tok.vocab_path.endswith("vocab.txt")


def test_missing_file_and_missing_specials(tmp_path):
  with pytest.raises(UserError, match="nope.txt"):
    load_tokenizer(tmp_path / "nope.txt")
  bad = tmp_path / "bad_vocab.txt"
  bad.write_text("[PAD]\n[UNK]\n[CLS]\nhello\n", encoding="utf-8")
  with pytest.raises(UserError, match=r"bad_vocab.txt.*\[SEP\] \[MASK\]"):
    load_tokenizer(bad)
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes("\n".join(SPECIAL_TOKENS + ("caf\xe9",)).encode("latin-1"))
  with pytest.raises(UserError, match="latin1.txt.*UTF-8"):
    load_tokenizer(latin1)


def test_pickles_for_worker_processes(minilm_dir):
  import pickle
  tok = load_tokenizer(_minilm_vocab(minilm_dir))
  clone = pickle.loads(pickle.dumps(tok))
  text = "Worker processes get the same tokenizer: naïve 中文 [MASK]."
  assert clone.encode(text) == tok.encode(text) and clone.lower_case and clone.vocab == tok.vocab


def test_import_loads_no_jax():
  """Data tools and fine-tuning's vocabulary discovery import this without jax's start-up."""
  import subprocess
  import sys
  code = ("import sys, bert_jax.tokenizer; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'orbax', 'flax')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_vocab_and_casing_found_beside_or_above_a_model(minilm_dir, tmp_path):
  """vocab.txt in the dir or up to two parents, else one written from tokenizer.json; casing
  from tokenizer_config.json, else from the vocab."""
  step = tmp_path / "work" / "checkpoints" / "10"
  step.mkdir(parents=True)
  assert find_vocab(step) is None and find_lower_case(step, None) is None
  vocab = _minilm_vocab(minilm_dir)
  (tmp_path / "work" / "vocab.txt").write_bytes(pathlib.Path(vocab).read_bytes())
  assert pathlib.Path(find_vocab(step)).read_bytes() == pathlib.Path(vocab).read_bytes()
  assert find_vocab(step, levels=1) is None
  assert find_lower_case(step, find_vocab(step)) is True   # inferred: an uncased vocab
  (step / "tokenizer_config.json").write_text('{"do_lower_case": false}')
  assert find_lower_case(step, find_vocab(step)) is False

  only_json = tmp_path / "hf"
  only_json.mkdir()
  (only_json / "tokenizer.json").write_bytes((minilm_dir / "tokenizer.json").read_bytes())
  found = find_vocab(only_json)
  assert pathlib.Path(found).read_text(encoding="utf-8").splitlines() == \
      pathlib.Path(vocab).read_text(encoding="utf-8").splitlines()


def test_written_tokenizer_files_load_in_transformers(minilm_dir, tmp_path):
  transformers = pytest.importorskip("transformers")
  write_tokenizer_files(tmp_path, _minilm_vocab(minilm_dir), True, 256)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  ours = load_tokenizer(find_vocab(tmp_path), find_lower_case(tmp_path, None))
  text = "Tokenizer files written here: Naïve café, 中文 [MASK]."
  assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
  assert hf.model_max_length == 256
  bad = tmp_path / "bad_vocab.txt"
  bad.write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
  with pytest.raises(UserError, match=r"bad_vocab.txt: special token\(s\) \[CLS\]"):
    write_tokenizer_files(tmp_path / "x", str(bad), True, 128)
