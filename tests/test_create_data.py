"""create-data end to end on real text: NSP/MLM statistics, layout, whole words (English and
Chinese), byte-identical output across worker counts, atomic output dirs, bad input via CLI."""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import pytest

from bert_jax.data import create, masking, read_instances, records
from bert_jax.errors import UserError
from bert_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def vocab(minilm_dir):
  return str(minilm_dir / "vocab.txt")


@pytest.fixture(scope="module")
def wiki_valid(shared_data):
  return str(shared_data / "wikitext-2" / "wiki.valid.tokens")


@pytest.fixture(scope="module")
def static_data(tmp_path_factory, wiki_valid, vocab):
  out = tmp_path_factory.mktemp("static") / "data"
  man = create.create_data([wiki_valid], vocab, out, dupe_factor=2, workers=2, progress=False)
  return out, man, list(read_instances(out))


def _original_ids(inst):
  ids = inst["input_ids"].copy()
  ids[inst["masked_lm_positions"]] = inst["masked_lm_ids"]
  return ids


def _maskable(inst):
  segment = inst["segment_ids"]
  length = len(segment)
  len_a = int(np.argmax(segment)) - 2
  maskable = np.ones(length, bool)
  maskable[[0, len_a + 1, length - 1]] = False
  return maskable


def test_layout_and_lengths(static_data, vocab):
  out, man, insts = static_data
  tok = load_tokenizer(vocab)
  assert man["splits"]["train"]["num_instances"] == len(insts) > 4000
  assert man["vocab"]["mask_id"] == tok.mask_id and len(man["vocab"]["sha256"]) == 64
  for inst in insts:
    ids, seg = _original_ids(inst), inst["segment_ids"]
    length = len(ids)
    assert 5 <= length <= 128 and len(seg) == length
    len_a = int(np.argmax(seg)) - 2
    assert len_a >= 1 and np.all(seg[:len_a + 2] == 0) and np.all(seg[len_a + 2:] == 1)
    assert ids[0] == tok.cls_id and ids[len_a + 1] == tok.sep_id and ids[-1] == tok.sep_id
    assert np.sum(ids == tok.sep_id) == 2 and np.sum(ids == tok.cls_id) == 1
    assert inst["input_ids"].dtype == np.int32 and inst["next_sentence_label"] in (0, 1)


def test_nsp_and_mlm_statistics(static_data, vocab):
  _, man, insts = static_data
  tok = load_tokenizer(vocab)
  random_next = np.mean([int(i["next_sentence_label"]) for i in insts])
  # A coin flip for every pair, except those whose segment was one sentence (always random).
  train = man["splits"]["train"]
  assert train["random_next"] == sum(int(i["next_sentence_label"]) for i in insts)
  forced = train["forced_random_next"]
  assert 0.47 < (train["random_next"] - forced) / (len(insts) - forced) < 0.53
  assert 0.45 < random_next < 0.6
  assert_masking_statistics(insts, _maskable, tok.mask_id, 20)


def assert_masking_statistics(insts, maskable_of, mask_id: int, max_predictions: int) -> int:
  """BERT's masking of static instances (either objective): 15% of the maskable tokens
  (`maskable_of(inst)`) predicted, capped, sorted, never elsewhere; 80/10/10. -> predictions."""
  predicted = maskable_total = 0
  kinds = {"mask": 0, "keep": 0, "random": 0}
  for inst in insts:
    pos = inst["masked_lm_positions"]
    maskable = maskable_of(inst)
    assert np.all(np.diff(pos) > 0) and maskable[pos].all()    # sorted, never [CLS]/[SEP]
    expected = masking.num_to_predict(np.array([maskable.sum()]), 0.15, max_predictions)[0]
    assert len(pos) == expected                                   # 15%, capped
    predicted += len(pos)
    maskable_total += maskable.sum()
    got, label = inst["input_ids"][pos], inst["masked_lm_ids"]
    kinds["mask"] += np.sum(got == mask_id)
    kinds["keep"] += np.sum(got == label)
    kinds["random"] += np.sum((got != mask_id) & (got != label))
  assert 0.14 < predicted / maskable_total < 0.16
  assert abs(kinds["mask"] / predicted - 0.8) < 0.02
  assert abs(kinds["keep"] / predicted - 0.1) < 0.015
  assert abs(kinds["random"] / predicted - 0.1) < 0.015
  return predicted


def _assert_whole_words(inst, continuation, mask_id):
  maskable = _maskable(inst)
  starts = masking.word_starts(maskable[None], continuation[None])[0]
  word = np.cumsum(starts) - 1
  chosen = np.zeros(len(maskable), bool)
  chosen[inst["masked_lm_positions"]] = True
  original = _original_ids(inst)
  multi = 0
  for w in np.unique(word[chosen]):
    members = maskable & (word == w)
    assert chosen[members].all(), "part of a word was masked"
    new, old = inst["input_ids"][members], original[members]
    kinds = {"mask" if a == mask_id else "keep" if a == b else "random" for a, b in zip(new, old)}
    assert len(kinds) == 1, "the pieces of one word were treated differently"
    multi += members.sum() > 1
  return multi


def test_whole_word_masking_english(tmp_path, wiki_valid, vocab):
  tok = load_tokenizer(vocab)
  create.create_data([wiki_valid], vocab, tmp_path / "d", dupe_factor=1, whole_word_mask=True,
                     workers=1, progress=False)
  multi = 0
  for inst in read_instances(tmp_path / "d"):
    continuation = tok.continuation_mask[_original_ids(inst)]
    multi += _assert_whole_words(inst, continuation, tok.mask_id)
    assert len(inst["masked_lm_positions"]) <= 20
  assert multi > 300   # words of several ## pieces were masked as wholes


@pytest.fixture(scope="module")
def cmrc_text(shared_data, tmp_path_factory):
  data = json.loads((shared_data / "cmrc2018" / "cmrc2018_dev.json").read_text("utf-8"))
  contexts = [p["context"] for article in data["data"][:120] for p in article["paragraphs"]]
  path = tmp_path_factory.mktemp("zh") / "cmrc.txt"
  path.write_text("\n\n".join(contexts) + "\n", encoding="utf-8")
  return str(path)


def test_chinese_word_continuation_follows_jieba(shared_data):
  jieba = pytest.importorskip("jieba")
  tok = load_tokenizer(shared_data / "vocab" / "bert-base-chinese-vocab.txt")
  text = "我们在北京大学学习自然语言处理，使用BERT模型。"
  ids, continuation = create.chinese_word_continuation(tok, text)
  assert ids == tok.encode(text)
  expected = []
  for word in jieba.lcut(text):
    pieces = tok.encode(word)
    expected += [False] + [True] * (len(pieces) - 1)
  assert continuation.tolist() == expected
  assert sum(expected) >= 8


def test_whole_word_masking_chinese(tmp_path, shared_data, cmrc_text):
  pytest.importorskip("jieba")
  vocab_zh = str(shared_data / "vocab" / "bert-base-chinese-vocab.txt")
  common = dict(dupe_factor=1, whole_word_mask=True, workers=2, progress=False, seed=7)
  create.create_data([cmrc_text], vocab_zh, tmp_path / "masked", **common)
  create.create_data([cmrc_text], vocab_zh, tmp_path / "plain", static_masking=False, **common)
  assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["static_masking"] is False
  tok = load_tokenizer(vocab_zh)
  multi = cjk_continuations = 0
  for masked, plain in zip(read_instances(tmp_path / "masked"), read_instances(tmp_path / "plain"),
                           strict=True):
    # Pairs depend only on the seed: the unmasked twin holds the same tokens, and the word
    # grouping (continuation flags) that the masking used.
    assert len(plain["masked_lm_positions"]) == 0
    np.testing.assert_array_equal(_original_ids(masked), plain["input_ids"])
    multi += _assert_whole_words(masked, plain["continuation"], tok.mask_id)
    cjk_continuations += int(plain["continuation"].sum())
  assert multi > 200 and cjk_continuations > 5000


def _dir_bytes(path):
  out = {}
  for f in sorted(os.listdir(path)):
    data = open(os.path.join(path, f), "rb").read()
    if f == records.MANIFEST:
      man = json.loads(data)
      man.pop("seconds")
      data = json.dumps(man, sort_keys=True).encode()
    out[f] = data
  return out


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, monkeypatch, wiki_valid, vocab):
  monkeypatch.setattr(create, "CHUNK_CHARS", 40_000)     # many chunks for 2 workers to share
  runs = {}
  for name, workers, seed in (("w1", 1, 3), ("w2", 2, 3), ("other_seed", 2, 4)):
    create.create_data([wiki_valid], vocab, tmp_path / name, dupe_factor=1, workers=workers,
                       seed=seed, progress=False)
    runs[name] = _dir_bytes(tmp_path / name)
  assert runs["w1"] == runs["w2"]
  shard = "train-00000-of-00001.array_record"
  assert runs["w1"][shard] != runs["other_seed"][shard]


def test_eval_split_and_shard_count(tmp_path, wiki_valid, vocab):
  man = create.create_data([wiki_valid], vocab, tmp_path / "a", dupe_factor=1, eval_fraction=0.3,
                           num_shards=3, workers=1, progress=False)
  train, held_out = man["splits"]["train"], man["splits"]["eval"]
  assert train["num_documents"] + held_out["num_documents"] == man["corpus"]["documents"] == 60
  assert 5 <= held_out["num_documents"] <= 35
  assert len(train["shards"]) == 3 and sorted(os.listdir(tmp_path / "a"))[0].startswith("eval-")
  assert len(list(read_instances(tmp_path / "a", split="eval"))) == held_out["num_instances"]
  one = create.create_data([wiki_valid], vocab, tmp_path / "b", dupe_factor=1, eval_fraction=0.3,
                           workers=1, progress=False)
  # Sharding only distributes the same records.
  shards_a = sorted(glob.glob(str(tmp_path / "a" / "train-*")))
  recs_a = sorted(r for s in shards_a for r in records.iter_shard(s))
  recs_b = sorted(records.iter_shard(str(tmp_path / "b" / one["splits"]["train"]["shards"][0])))
  assert recs_a == recs_b
  first = next(read_instances(shards_a[0]))
  assert set(first) == {"input_ids", "segment_ids", "masked_lm_positions", "masked_lm_ids",
                        "next_sentence_label"}


def _cli(args, capsys):
  code = create.main(args + ["--no-progress"])
  captured = capsys.readouterr()
  return code, captured.err.strip()


def _assert_one_line_error(code, err, *needles):
  assert code == 2
  assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
  for needle in needles:
    assert needle in err, err


def test_cli_bad_inputs(tmp_path, capsys, vocab):
  out = str(tmp_path / "out")
  code, err = _cli(["--input", str(tmp_path / "missing.txt"), "--vocab", vocab, "--output", out], capsys)
  _assert_one_line_error(code, err, "missing.txt")
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n  \n")
  code, err = _cli(["--input", str(empty), "--vocab", vocab, "--output", out], capsys)
  _assert_one_line_error(code, err, "empty.txt")
  assert not os.path.exists(out) or not os.listdir(out)
  bad_vocab = tmp_path / "vocab.txt"
  bad_vocab.write_text("the\nof\nand\n")
  code, err = _cli(["--input", "sample", "--vocab", str(bad_vocab), "--output", out], capsys)
  _assert_one_line_error(code, err, "vocab.txt", "[CLS]")
  code, err = _cli(["--input", "sample", "--vocab", vocab, "--output", out, "--max-seq-length", "7"], capsys)
  _assert_one_line_error(code, err, "--max-seq-length")
  code, err = _cli(["--input", "sample", "--vocab", vocab, "--output", out,
                    "--max-predictions-per-seq", "0"], capsys)
  _assert_one_line_error(code, err, "--max-predictions-per-seq")


def test_degenerate_inputs_are_one_line_and_leave_nothing(tmp_path, capsys, vocab):
  """A vocab of special tokens only ended in a worker's traceback ("high <= 0"); an eval
  fraction that took every document blamed the vocab and left a finished-looking eval shard."""
  corpus = tmp_path / "c.txt"
  corpus.write_text("The cat sat. It purred.\nThen it slept.\n\nA dog ran. It barked.\n")
  specials = tmp_path / "specials.txt"
  specials.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
  out = tmp_path / "out"
  code, err = _cli(["--input", str(corpus), "--vocab", str(specials), "--output", str(out)],
                   capsys)
  _assert_one_line_error(code, err, f"--vocab {specials}", "all special tokens")
  assert not out.exists()
  code, err = _cli(["--input", str(corpus), "--vocab", vocab, "--output", str(out),
                    "--eval-fraction", "0.999"], capsys)
  _assert_one_line_error(code, err, "--eval-fraction 0.999: all 2 documents went to the eval "
                         "split, none to training")
  assert not out.exists()


def test_cli_unknown_tfds_dataset(tmp_path, capsys, vocab):
  code, err = _cli(["--input", "tfds:no_such_dataset_xyz", "--vocab", vocab, "--output",
                    str(tmp_path / "o")], capsys)
  _assert_one_line_error(code, err, "no_such_dataset_xyz")


def test_one_sentence_documents_and_long_lines(tmp_path, capsys, vocab):
  one = tmp_path / "one.txt"
  one.write_text("".join(f"Document number {d} has only this sentence in it.\n\n" for d in range(30)))
  code, err = _cli(["--input", str(one), "--vocab", vocab, "--output", str(tmp_path / "o1"),
                    "--input-format", "bert", "--dupe-factor", "2"], capsys)
  assert code == 0
  insts = list(read_instances(tmp_path / "o1"))
  assert len(insts) == 60 and all(int(i["next_sentence_label"]) == 1 for i in insts)
  # ...and it says so, in one line with the counts, which the manifest keeps too.
  assert err == ("warning: NSP: 60 of 60 instances (100%) got a random B because their segment "
                 "was one sentence, so 100% of the labels are 'random next' instead of about "
                 "50%: one-sentence documents (bert format: one sentence per line, a blank "
                 "line between documents), or sentences about as long as --max-seq-length?")
  man = json.loads((tmp_path / "o1" / records.MANIFEST).read_text())
  assert (man["splits"]["train"]["forced_random_next"], man["splits"]["train"]["random_next"]) \
      == (60, 60)
  assert man["warnings"] == [err.removeprefix("warning: ")]
  long = tmp_path / "long.txt"
  words = " ".join(f"word{k % 97}" for k in range(60_000))
  long.write_text(f"A short line.\n{words}\nAnother line here.\n\nSecond doc.\nIt ends.\n")
  code, _ = _cli(["--input", str(long), "--vocab", vocab, "--output", str(tmp_path / "o2"),
                  "--input-format", "bert", "--max-seq-length", "64"], capsys)
  assert code == 0
  insts = list(read_instances(tmp_path / "o2"))
  assert insts and max(len(i["input_ids"]) for i in insts) <= 64


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, capsys, vocab):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"The first sentence is fine.\nThe second has bad \xff\xfe bytes.\n"
                  b"A third one.\n\nAnother document.\nWith two lines.\n")
  code, err = _cli(["--input", str(bad), "--vocab", vocab, "--output", str(tmp_path / "o"),
                    "--input-format", "bert"], capsys)
  assert code == 0
  size = bad.stat().st_size
  assert err == f"warning: {bad}: 2 byte(s) of {size} that are not UTF-8 replaced with U+FFFD"
  man = json.loads((tmp_path / "o" / records.MANIFEST).read_text())
  assert man["corpus"]["bad_bytes"] == 2 and man["corpus"]["bytes"] == size
  assert man["corpus"]["files_with_bad_bytes"] == [str(bad)]
  assert man["splits"]["train"]["num_instances"] > 0


def test_binary_input_is_refused_unless_allowed(tmp_path, capsys, vocab):
  """A binary file used to give exit 0 and a dataset of garbage."""
  binary = tmp_path / "model.bin"
  binary.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, np.uint8).tobytes())
  out = tmp_path / "o"
  args = ["--input", str(binary), "--vocab", vocab, "--output", str(out), "--dupe-factor", "1"]
  code, err = _cli(args, capsys)
  _assert_one_line_error(code, err, f"--input {binary}: ", "of its 200,000 bytes", "not UTF-8",
                         "--allow-replaced-bytes")
  assert not out.exists()                                   # nothing half-written
  code, err = _cli(args + ["--allow-replaced-bytes"], capsys)
  assert code == 0
  warning = [line for line in err.splitlines() if "not UTF-8" in line]
  assert len(warning) == 1 and warning[0].startswith(f"warning: {binary}: ")
  man = json.loads((out / records.MANIFEST).read_text())
  assert man["corpus"]["bytes"] == 200_000 and 0.3 < man["corpus"]["bad_bytes"] / 200_000 < 0.6
  assert man["corpus"]["allow_replaced_bytes"] is True


def test_one_huge_document_warns_that_random_bs_come_from_it(tmp_path, capsys, vocab):
  huge = tmp_path / "huge.txt"
  huge.write_text("".join(f"Sentence {k} of the only document talks about item {k % 13}.\n"
                          for k in range(400)))
  code, err = _cli(["--input", str(huge), "--vocab", vocab, "--output", str(tmp_path / "o"),
                    "--input-format", "bert", "--dupe-factor", "1"], capsys)
  assert code == 0
  man = json.loads((tmp_path / "o" / records.MANIFEST).read_text())
  train = man["splits"]["train"]
  assert train["random_next"] > 0 and train["random_next_same_document"] == train["random_next"]
  assert err == (f"warning: NSP: {train['random_next']} of {train['random_next']} random-next "
                 "Bs (100%) come from the same document as A, since no other document was at "
                 "hand (one huge document?); separate the documents with blank lines")
  # A normal corpus (the embedded sample: short documents) gives no NSP warning.
  code, err = _cli(["--input", "sample", "--vocab", vocab, "--output", str(tmp_path / "s"),
                    "--dupe-factor", "1"], capsys)
  assert code == 0 and "NSP" not in err


def test_wikitext_unk_is_the_vocab_unk_token(tmp_path, capsys, vocab):
  """WikiText's <unk> used to become the three tokens <, unk, >."""
  wiki = tmp_path / "wiki.valid.tokens"
  wiki.write_text(" = Title = \n\n The <unk> sat on the mat . It was a <unk> day .\n")
  code, _ = _cli(["--input", str(wiki), "--vocab", vocab, "--output", str(tmp_path / "o"),
                  "--dupe-factor", "1", "--masked-lm-prob", "0.01"], capsys)
  assert code == 0
  tok = load_tokenizer(vocab)
  ids = np.concatenate([_original_ids(i) for i in read_instances(tmp_path / "o")]).tolist()
  assert tok.unk_id in ids
  assert not set(tok.convert_tokens_to_ids(["<", ">"])) & set(ids)
  # Outside WikiText files the text is tokenised as BertTokenizerFast does: "<unk>" is 3 pieces.
  assert tok.tokenize("a <unk> b") == ["a", "<", "un", "##k", ">", "b"]


def test_unwritable_output_is_refused_before_reading(tmp_path, capsys, vocab):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  code, err = _cli(["--input", "sample", "--vocab", vocab, "--output", str(blocker / "o")],
                   capsys)
  _assert_one_line_error(code, err, f"--output {blocker / 'o'}: {blocker} is a file")
  code, err = _cli(["--input", "sample", "--vocab", vocab, "--output", "/proc/bert-jax-o"],
                   capsys)
  _assert_one_line_error(code, err, "--output /proc/bert-jax-o: cannot write in /proc")


def test_output_dir_rules(tmp_path, capsys, vocab):
  out = tmp_path / "out"
  args = ["--input", "sample", "--vocab", vocab, "--output", str(out), "--dupe-factor", "1"]
  assert _cli(args, capsys)[0] == 0
  code, err = _cli(args, capsys)
  _assert_one_line_error(code, err, "already holds a complete dataset")
  # An interrupted run (temporary shards, no manifest) is cleaned and redone.
  os.remove(out / records.MANIFEST)
  shard = next(out.glob("train-*"))
  os.rename(shard, out / "train-00000.array_record.tmp")
  assert _cli(args, capsys)[0] == 0
  assert sorted(os.listdir(out)) == [records.MANIFEST, shard.name]
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  code, err = _cli(args[:-3] + [str(foreign), "--dupe-factor", "1"], capsys)
  _assert_one_line_error(code, err, "not empty")
  assert (foreign / "notes.txt").exists()


def test_missing_jieba_is_a_user_error(tmp_path, monkeypatch, cmrc_text, shared_data):
  monkeypatch.setitem(sys.modules, "jieba", None)
  with pytest.raises(UserError, match="jieba"):
    create.create_data([cmrc_text], shared_data / "vocab" / "bert-base-chinese-vocab.txt",
                       tmp_path / "o", whole_word_mask=True, workers=1, dupe_factor=1,
                       progress=False)
  assert not (tmp_path / "o").exists()


def test_read_instances_missing_path():
  with pytest.raises(UserError, match="not found"):
    next(read_instances("/nonexistent/dir/x.array_record"))
