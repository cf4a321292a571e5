"""Corpus readers on real files: BERT format, WikiText, .gz, directories, bad bytes, errors."""

from __future__ import annotations

import gzip
import pathlib
import re
import shutil

import pytest

from bert_jax.data import corpus
from bert_jax.data.corpus import iter_documents, resolve_inputs, sample_corpus_path
from bert_jax.data.sentences import MAX_SENTENCE_CHARS, split_sentences
from bert_jax.data.text_lines import CorpusStats, CorpusWarning
from bert_jax.errors import UserError


def _bert_format_reference(path):
  """Documents of a BERT-format file, computed the obvious in-memory way."""
  blocks = re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))
  return [[line.strip() for line in block.split("\n") if line.strip()] for block in blocks
          if block.strip()]


def test_bert_format_real_sample(shared_data):
  path = shared_data / "bert" / "sample_text.txt"
  stats = CorpusStats()
  documents = list(iter_documents(str(path), stats=stats))
  assert documents == _bert_format_reference(path)
  assert len(documents) == 3 and stats.documents == 3
  assert stats.sentences == sum(map(len, documents)) and stats.bad_bytes == 0
  assert "力加勝北区" in documents[0][0]  # Unicode passes through untouched


def test_wikitext_articles_split_at_titles_only(shared_data):
  path = shared_data / "wikitext-2" / "wiki.valid.tokens"
  lines = path.read_text(encoding="utf-8").split("\n")
  titles = [line for line in lines if line.startswith(" = ") and not line.startswith(" = = ")]
  subheadings = [line for line in lines if line.startswith(" = = ")]
  assert len(titles) > 10 and len(subheadings) > len(titles)
  documents = list(iter_documents(str(path)))  # auto: .tokens -> text
  assert len(documents) == len(titles)
  sentences = [s for document in documents for s in document]
  assert not any(s.startswith("= ") for s in sentences)  # headings are not sentences
  # Sentences end where the text says so: WikiText spaces out its full stops (" . ").
  assert sum(s.endswith((".", "!", "?", '"')) for s in sentences) > 0.9 * len(sentences)
  # The first article carries on past its subsection headings, and no word is lost.
  start, stop = lines.index(titles[0]), lines.index(titles[1])
  article = [line for line in lines[start + 1:stop] if not line.startswith(" = = ")]
  # (WikiText's <unk> comes out as the literal [UNK]: the tokenizer's [UNK] id, not < unk >.)
  assert " ".join(documents[0]).split() == " ".join(article).replace("<unk>", "[UNK]").split()
  assert len(set(subheadings) & set(lines[start:stop])) >= 2
  # Forcing bert format on the same file gives one "sentence" per line instead.
  as_bert = list(iter_documents(str(path), input_format="bert"))
  assert len(as_bert) > 5 * len(documents)


def test_gz_directory_and_glob(shared_data, tmp_path):
  source = shared_data / "bert" / "sample_text.txt"
  expected = _bert_format_reference(source)
  folder = tmp_path / "corpus"
  (folder / "sub").mkdir(parents=True)
  with gzip.open(folder / "sub" / "b.txt.gz", "wb") as f:
    f.write(source.read_bytes())
  shutil.copy(source, folder / "a.txt")
  (folder / ".hidden").write_text("secret line\n", encoding="utf-8")
  assert list(iter_documents(str(folder / "sub" / "b.txt.gz"))) == expected
  stats = CorpusStats()
  assert list(iter_documents(str(folder), stats=stats)) == expected + expected  # a.txt, sub/b.txt.gz
  assert stats.files == 2
  assert list(iter_documents(str(folder / "**" / "*.gz"))) == expected
  assert list(iter_documents([str(folder / "a.txt"), str(folder / "a.txt")])) == expected * 2
  assert [s.path for s in resolve_inputs(str(folder))] == [str(folder / "a.txt"),
                                                           str(folder / "sub" / "b.txt.gz")]


def test_non_utf8_bytes_replaced_and_counted(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes(b"caf\xe9 au lait.\nA good \xff\xfe day.\r\n\r\nsecond document\n")
  stats = CorpusStats()
  with pytest.warns(CorpusWarning, match="latin1.txt: 3 byte"):
    documents = list(iter_documents(str(path), stats=stats))
  assert documents == [["caf\ufffd au lait.", "A good \ufffd\ufffd day."], ["second document"]]
  assert stats.bad_bytes == 3 and stats.files_with_bad_bytes == [str(path)]


def test_bom_crlf_and_plain_text_format(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_bytes("\ufeffFirst one. Second one!  Third?\r\n\r\n我们去北京。你呢？好的；走吧\r\n".encode())
  documents = list(iter_documents(str(path), input_format="text"))
  assert documents == [["First one.", "Second one!", "Third?"], ["我们去北京。", "你呢？", "好的；", "走吧"]]
  assert list(iter_documents(str(path)))[0] == ["First one. Second one!  Third?"]  # auto -> bert


def test_sentence_splitter_rules():
  text = 'Dr. Smith met J. R. Tolkien. "Really?" she asked. It cost approx. three pounds! Done'
  assert split_sentences(text) == ["Dr. Smith met J. R. Tolkien.", '"Really?" she asked.',
                                   "It cost approx. three pounds!", "Done"]
  assert split_sentences("他说：“好。”然后走了。") == ["他说：“好。”", "然后走了。"]
  assert split_sentences("   ") == []


def test_very_long_lines_are_split(tmp_path):
  sentence = "The quick brown fox jumps over the lazy dog. "
  long_english = sentence * 200  # 9,000 characters on one line
  chinese = "我们在北京大学学习中文和数学" * 160_000  # ~6.7 MB in one line, no punctuation
  path = tmp_path / "long.txt"
  path.write_text(long_english + "\n\n" + chinese + "\n", encoding="utf-8")
  stats = CorpusStats()
  documents = list(iter_documents(str(path), stats=stats))
  assert len(documents) == 2 and stats.long_lines_split >= 2
  assert documents[0] == [sentence.strip()] * 200
  assert all(len(s) <= MAX_SENTENCE_CHARS for d in documents for s in d)
  assert "".join(documents[1]) == chinese  # nothing lost, no character cut in half
  assert stats.bad_bytes == 0


def test_sample_corpus():
  for lang in ("en", "zh"):
    documents = list(iter_documents(f"sample:{lang}"))
    assert len(documents) >= 20
    assert all(len(d) >= 3 for d in documents)
    assert documents == _bert_format_reference(__import__("pathlib").Path(sample_corpus_path(lang)))
  assert list(iter_documents("sample")) == list(iter_documents("sample:en"))
  with pytest.raises(UserError, match="'fr'"):
    sample_corpus_path("fr")


def test_bad_inputs_raise_user_errors(tmp_path):
  with pytest.raises(UserError, match="missing.txt: no such file"):
    iter_documents(str(tmp_path / "missing.txt"))  # raised at call time, not on first next()
  with pytest.raises(UserError, match=r"\*.nothing: pattern matches no files"):
    iter_documents(str(tmp_path / "*.nothing"))
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(UserError, match="empty_dir: directory holds no files"):
    iter_documents(str(tmp_path / "empty_dir"))
  blank = tmp_path / "blank.txt"
  blank.write_text("\n \n\t\n", encoding="utf-8")
  with pytest.raises(UserError, match="blank.txt: no text found"):
    list(iter_documents(str(blank)))
  with pytest.raises(UserError, match="--input-format 'xml'"):
    iter_documents(str(blank), input_format="xml")
  broken = tmp_path / "broken.gz"
  broken.write_bytes(b"not gzip at all")
  with pytest.raises(UserError, match="broken.gz: cannot read"):
    list(iter_documents(str(broken)))


def test_tfds_missing_dataset_is_a_user_error(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow_datasets")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  documents = iter_documents("tfds:no_such_dataset_xyz/config:train")
  with pytest.raises(UserError, match="tfds:no_such_dataset_xyz/config:train.*not available"):
    next(documents)
  sources = resolve_inputs(["tfds:wikipedia/20230601.en", "tfds:c4/en:validation"])
  assert [(s.kind, s.path, s.split) for s in sources] == [
      ("tfds", "wikipedia/20230601.en", "train"), ("tfds", "c4/en", "validation")]
  assert corpus.FORMATS == ("auto", "bert", "text")


def _jsonl_of_bert_format(path, out, *, per_line=(1, 2, 1, 3)):
  """The raw blank-line-separated blocks of a BERT-format file as JSON lines: 1, 2, 1, 3, ...
  documents per line (joined by a blank line inside the field), with another field beside."""
  import json
  blocks = [b for b in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if b.strip()]
  lines, i, n = [], 0, 0
  while i < len(blocks):
    take = per_line[n % len(per_line)]
    lines.append(json.dumps({"id": n, "text": "\n\n".join(blocks[i:i + take])},
                            ensure_ascii=n % 2 == 0))
    i, n = i + take, n + 1
  opener = gzip.open if str(out).endswith(".gz") else open
  with opener(out, "wt", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n\n")   # a trailing blank line too
  return out


@pytest.mark.parametrize("lang, name", [("en", "c.jsonl"), ("zh", "c.jsonl.gz"),
                                        ("en", "c.json")])
def test_jsonl_documents_equal_those_of_the_same_text_in_bert_format(tmp_path, lang, name):
  bert = pathlib.Path(sample_corpus_path(lang))
  jsonl = _jsonl_of_bert_format(bert, tmp_path / name)
  stats = CorpusStats()
  documents = list(iter_documents(str(jsonl), text_field="text", stats=stats))
  assert documents == list(iter_documents(str(bert))) and len(documents) >= 20
  assert stats.documents == len(documents)


def test_jsonl_without_text_field_is_refused_naming_the_flag(tmp_path):
  jsonl = _jsonl_of_bert_format(pathlib.Path(sample_corpus_path("en")), tmp_path / "c.jsonl")
  sniffed = tmp_path / "corpus.txt"            # JSON lines under a text file's name
  shutil.copyfile(jsonl, sniffed)
  for path in (jsonl, sniffed):
    with pytest.raises(UserError, match=r"looks like JSON lines \(fields of line 1: id, text\)"
                       r".*--text-field FIELD"):
      list(iter_documents(str(path)))
    with pytest.raises(UserError, match=r"looks like JSON lines"):
      list(iter_documents(str(path), input_format="bert"))   # an explicit format: still refused
  with pytest.raises(UserError, match=r"line 1 has no field 'body' \(fields: id, text\)"):
    list(iter_documents(str(jsonl), text_field="body"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "a"}\n{"text": "b"\n', encoding="utf-8")
  with pytest.raises(UserError, match="bad.jsonl: line 2 is not valid JSON"):
    list(iter_documents(str(bad), text_field="text"))
  # Plain BERT-format text is unaffected by --text-field, and a line that merely starts with {
  plain = tmp_path / "plain.txt"
  plain.write_text("{curly} start.\nsecond.\n\nnext doc.\n", encoding="utf-8")
  assert list(iter_documents(str(plain), text_field="text")) == [
      ["{curly} start.", "second."], ["next doc."]]


def test_jsonl_field_as_running_text(tmp_path):
  path = tmp_path / "c.ndjson"
  path.write_text('{"t": "One here. Two there.\\nThree!\\n\\nNew doc."}\n{"t": null}\n'
                  '{"t": "Last."}\n', encoding="utf-8")
  assert list(iter_documents(str(path), input_format="text", text_field="t")) == [
      ["One here.", "Two there.", "Three!"], ["New doc."], ["Last."]]


def test_create_data_and_train_vocab_cli_refuse_jsonl_without_text_field(tmp_path, capsys):
  from bert_jax.data.create import main as create_main
  from bert_jax.vocab import main as vocab_main
  jsonl = _jsonl_of_bert_format(pathlib.Path(sample_corpus_path("en")), tmp_path / "c.jsonl")
  assert vocab_main(["--input", str(jsonl), "--vocab-size", "300",
                     "--output", str(tmp_path / "v.txt")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--text-field" in err and not (tmp_path / "v.txt").exists()
  # With the flag: the same vocabulary as from the BERT-format file.
  assert vocab_main(["--input", str(jsonl), "--text-field", "text", "--vocab-size", "300",
                     "--output", str(tmp_path / "v.txt")]) == 0
  assert vocab_main(["--input", sample_corpus_path("en"), "--vocab-size", "300",
                     "--output", str(tmp_path / "ref.txt")]) == 0
  assert (tmp_path / "v.txt").read_text() == (tmp_path / "ref.txt").read_text()
  capsys.readouterr()
  assert create_main(["--input", str(jsonl), "--vocab", str(tmp_path / "v.txt"), "--output",
                      str(tmp_path / "data"), "--max-seq-length", "32",
                      "--max-predictions-per-seq", "4", "--workers", "1"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "looks like JSON lines" in err and "--text-field" in err
  assert not (tmp_path / "data").exists()
