"""The MLM-only objective end to end: create-data --objective mlm (full rows, [SEP] between
documents, DOC-SENTENCES, masking statistics, whole words in Chinese, static and dynamic), the
loss without an NSP term, a tiny pretraining that resumes bit-exactly after SIGKILL with no
nsp_* metric anywhere, its export loading in transformers' fill-mask, and the objective check."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax.data import create, masking, read_instances
from bert_jax.data.corpus import iter_documents
from bert_jax.data.pipeline import make_iterator
from bert_jax.pretraining import train
from bert_jax.tokenizer import load_tokenizer
from test_create_data import _original_ids, assert_masking_statistics
from test_train import TOTAL, assert_bit_equal, completed_run, final_params, \
  kill_past_step_10_and_rerun, rows, run_args

SEQ, PREDS, DUPES = 64, 10, 3


@pytest.fixture(scope="module")
def en_vocab(tmp_path_factory):
  from bert_jax.vocab import train_vocab
  return train_vocab(["sample:en"], 1000, str(tmp_path_factory.mktemp("vocab") / "vocab.txt"))


def _make(vocab, out, inputs=("sample:en",), **kw):
  args = dict(objective="mlm", max_seq_length=SEQ, max_predictions_per_seq=PREDS,
              dupe_factor=DUPES, workers=1, progress=False, seed=5)
  args.update(kw)
  return create.create_data(list(inputs), vocab, out, **args)


def _documents(tok, inputs=("sample:en",)):
  return [np.array([t for s in doc for t in tok.encode(s)], np.int32)
          for doc in iter_documents(list(inputs))]


@pytest.fixture(scope="module")
def en_rows(en_vocab, tmp_path_factory):
  out = tmp_path_factory.mktemp("mlm") / "data"
  man = _make(en_vocab, out)
  return man, list(read_instances(out))


def test_rows_are_full_one_segment_and_only_the_last_is_short(en_rows, en_vocab):
  man, insts = en_rows
  tok = load_tokenizer(en_vocab)
  assert man["objective"] == "mlm" and not man["doc_sentences"]
  assert "random_next" not in man["splits"]["train"]
  assert man["splits"]["train"]["num_instances"] == len(insts) > 200
  lengths = [len(i["input_ids"]) for i in insts]
  # The last row (its DUPES copies, the split's last records) is the only short one.
  assert all(n == SEQ for n in lengths[:-DUPES]) and all(n < SEQ for n in lengths[-DUPES:])
  for inst in insts:
    ids = _original_ids(inst)
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and ids[1] != tok.sep_id
    assert not inst["segment_ids"].any() and inst["next_sentence_label"] == 0


def test_rows_are_the_documents_in_order_with_a_sep_between_documents(en_rows, en_vocab):
  """The rows' texts, read one after the other, are the corpus's documents joined by [SEP]
  (a [SEP] that would start a row is left out: the row before ended the document)."""
  _, insts = en_rows
  tok = load_tokenizer(en_vocab)
  docs = _documents(tok)
  expected = np.concatenate([x for d in docs for x in (d, [tok.sep_id])][:-1])
  copies = [_original_ids(i) for i in insts]
  for k in range(0, len(copies), DUPES):   # each row DUPES times in a row, masked anew
    assert all(np.array_equal(copies[k], c) for c in copies[k:k + DUPES])
    assert len({i["masked_lm_positions"].tobytes() for i in insts[k:k + DUPES]}) > 1
  pos = dropped = 0
  for ids in copies[::DUPES]:
    text = ids[1:-1]
    np.testing.assert_array_equal(text, expected[pos:pos + len(text)])
    pos += len(text)
    if pos < len(expected) and expected[pos] == tok.sep_id:
      pos, dropped = pos + 1, dropped + 1
  assert pos == len(expected)
  between = sum(int((ids[1:-1] == tok.sep_id).sum()) for ids in copies[::DUPES])
  assert between + dropped == len(docs) - 1 > 50


def test_doc_sentences_rows_stay_within_documents(en_vocab, tmp_path):
  tok = load_tokenizer(en_vocab)
  man = _make(en_vocab, tmp_path / "d", dupe_factor=1, doc_sentences=True)
  assert man["doc_sentences"]
  docs = iter(_documents(tok))
  doc, pos = next(docs), 0
  for inst in read_instances(tmp_path / "d"):
    ids = _original_ids(inst)
    assert int((ids == tok.sep_id).sum()) == 1 and ids[-1] == tok.sep_id   # none between
    np.testing.assert_array_equal(ids[1:-1], doc[pos:pos + len(ids) - 2])
    pos += len(ids) - 2
    assert len(ids) == SEQ or pos == len(doc)     # short only at a document's end
    if pos == len(doc):
      doc, pos = next(docs, None), 0
  assert doc is None


def test_masking_statistics_as_for_mlm_nsp(en_rows, en_vocab):
  _, insts = en_rows
  tok = load_tokenizer(en_vocab)

  def maskable(inst):
    ids = _original_ids(inst)
    return (ids != tok.cls_id) & (ids != tok.sep_id)     # the [SEP]s between documents too

  assert assert_masking_statistics(insts, maskable, tok.mask_id, PREDS) > 5000


def test_many_chunks_same_bytes_whatever_the_workers_and_one_short_row(en_vocab, tmp_path,
                                                                       monkeypatch):
  """Chunk tails are packed in the main process: still one short row per split, no token
  lost, and the bytes do not depend on the worker count."""
  monkeypatch.setattr(create, "CHUNK_DOCUMENTS", 7)
  tok = load_tokenizer(en_vocab)
  out = {}
  for workers in (1, 2):
    man = _make(en_vocab, tmp_path / f"w{workers}", dupe_factor=1, workers=workers,
                eval_fraction=0.2)
    out[workers] = {p.name: p.read_bytes() for p in (tmp_path / f"w{workers}").iterdir()
                    if p.suffix == ".array_record"}
  assert out[1] == out[2]
  text_tokens = 0
  for split in ("train", "eval"):
    lengths, ids = [], []
    for inst in read_instances(tmp_path / "w1", split):
      lengths.append(len(inst["input_ids"]))
      ids.append(_original_ids(inst))
    assert all(n == SEQ for n in lengths[:-1]) and lengths[-1] < SEQ
    assert man["splits"][split]["num_instances"] == len(lengths)
    text_tokens += sum(int(((i != tok.sep_id) & (i != tok.cls_id)).sum()) for i in ids)
  assert text_tokens == sum(len(d) for d in _documents(tok))


def _whole_word_violations(ids, positions, continuation, tok):
  """Positions of words that were masked in part; 0 when every masked word is whole."""
  maskable = (ids != tok.cls_id) & (ids != tok.sep_id)
  starts = masking.word_starts(maskable[None], continuation[None])[0]
  word = np.cumsum(starts) - 1
  chosen = np.zeros(len(ids), bool)
  chosen[positions] = True
  bad = 0
  for w in np.unique(word[chosen]):
    bad += not chosen[maskable & (word == w)].all()
  return bad, int(sum((maskable & (word == w)).sum() > 1 for w in np.unique(word[chosen])))


def test_chinese_whole_words_static_and_dynamic(shared_data, tmp_path):
  """jieba words of the Chinese sample: the continuation bits stored for dynamic masking, and
  the static masks of the same rows, mask whole words; the pipeline's dynamic masks too."""
  pytest.importorskip("jieba")
  vocab = str(shared_data / "vocab" / "bert-base-chinese-vocab.txt")
  tok = load_tokenizer(vocab)
  common = dict(inputs=("sample:zh",), dupe_factor=1, whole_word_mask=True,
                max_predictions_per_seq=20)
  _make(vocab, tmp_path / "static", **common)
  man = _make(vocab, tmp_path / "plain", static_masking=False, **common)
  plain = list(read_instances(tmp_path / "plain"))
  static = list(read_instances(tmp_path / "static"))
  assert len(plain) == len(static) > 20
  multi = 0
  for p, s in zip(plain, static):
    np.testing.assert_array_equal(p["input_ids"], _original_ids(s))   # the same rows
    bad, m = _whole_word_violations(p["input_ids"], s["masked_lm_positions"],
                                    p["continuation"], tok)
    assert bad == 0
    multi += m
  assert multi > 20   # words of several characters were masked as wholes
  it = make_iterator(tmp_path / "plain", batch_size=4, seq_len=SEQ, max_predictions=20, seed=0,
                     shuffle=False, num_epochs=1, process_index=0, process_count=1)
  cont = np.stack([np.pad(p["continuation"], (0, SEQ - len(p["continuation"])))
                   for p in plain])
  ids_all = np.stack([np.pad(p["input_ids"], (0, SEQ - len(p["input_ids"]))) for p in plain])
  row = 0
  for batch in it:
    assert not batch["token_type_ids"].any() and not batch["next_sentence_label"].any()
    for b in range(len(batch["input_ids"])):
      n = int(batch["masked_lm_weights"][b].sum())
      positions = batch["masked_lm_positions"][b, :n]
      np.testing.assert_array_equal(batch["masked_lm_ids"][b, :n], ids_all[row, positions])
      assert _whole_word_violations(ids_all[row], positions, cont[row], tok)[0] == 0
      row += 1
  assert row == man["splits"]["train"]["num_instances"] // 4 * 4


def test_dynamic_masking_never_masks_the_sep_between_documents(en_vocab, tmp_path):
  tok = load_tokenizer(en_vocab)
  _make(en_vocab, tmp_path / "d", dupe_factor=1, static_masking=False)
  seps = 0
  for batch in make_iterator(tmp_path / "d", batch_size=8, seq_len=SEQ, max_predictions=PREDS,
                             seed=1, num_epochs=3, process_index=0, process_count=1):
    chosen = batch["masked_lm_ids"][batch["masked_lm_weights"] > 0]   # the original tokens
    assert len(chosen) and not np.isin(chosen, [tok.sep_id, tok.cls_id]).any()
    seps += int((batch["input_ids"][:, 1:-1] == tok.sep_id).sum())
  assert seps > 50


# ----------------------------------------------------------------------------- the loss


def test_mlm_loss_has_no_nsp_term():
  from bert_jax.config import get_preset
  from bert_jax.training import steps
  config = get_preset("tiny", vocab_size=120, num_hidden_layers=1, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
  rng = np.random.default_rng(0)
  batch = dict(input_ids=rng.integers(5, 120, (4, 16)).astype(np.int32),
               token_type_ids=np.zeros((4, 16), np.int32), attention_mask=np.ones((4, 16),
                                                                                   np.int32),
               masked_lm_positions=np.tile(np.arange(1, 4, dtype=np.int32), (4, 1)),
               masked_lm_ids=rng.integers(5, 120, (4, 3)).astype(np.int32),
               masked_lm_weights=np.ones((4, 3), np.float32),
               next_sentence_label=np.array([0, 1, 1, 0], np.int32))
  from bert_jax.modeling.heads import BertForPreTraining
  params = BertForPreTraining(config).init(jax.random.PRNGKey(0), batch["input_ids"],
                                           batch["token_type_ids"],
                                           batch["attention_mask"])["params"]
  grads = {}
  for objective in ("mlm", "mlm_nsp"):
    loss = steps.pretraining_loss(config, objective)
    sums = loss.sums(params, batch, None)
    metrics = loss.metrics(sums)
    assert metrics["loss"] == metrics["mlm_loss"] if objective == "mlm" else \
        metrics["loss"] == pytest.approx(float(metrics["mlm_loss"] + metrics["nsp_loss"]))
    assert (not any(k.startswith("nsp") for k in {**sums, **metrics})) == (objective == "mlm")
    grads[objective] = jax.grad(lambda p: loss.objective(loss.sums(p, batch, None),
                                                         loss.counts(batch)))(params)
  nsp_head = grads["mlm"]["cls"]["seq_relationship"]
  assert all(not jnp.any(g) for g in jax.tree.leaves(nsp_head))   # no NSP term at all
  assert any(jnp.any(g) for g in jax.tree.leaves(grads["mlm_nsp"]["cls"]["seq_relationship"]))


# ----------------------------------------------------------------------------- pretraining


@pytest.fixture(scope="module")
def mlm_prepared(prepared, tmp_path_factory):
  """The pretraining tests' vocab with MLM-only data of their corpus (lengths 32 and 64)."""
  vocab = prepared[0]
  corpus = pathlib.Path(vocab).parent / "corpus.txt"
  root = tmp_path_factory.mktemp("mlm_prepared")
  dirs = []
  for seq, preds in ((32, 5), (64, 10)):
    create.create_data([str(corpus)], vocab, str(root / f"data{seq}"), objective="mlm",
                       max_seq_length=seq, max_predictions_per_seq=preds, dupe_factor=1, seed=1,
                       eval_fraction=0.2, workers=1, progress=False)
    dirs.append(str(root / f"data{seq}"))
  return vocab, dirs


def mlm_args(mlm_prepared, workdir, *extra):
  return run_args(mlm_prepared, workdir, "--config.objective=mlm", *extra)


@pytest.fixture(scope="module")
def mlm_reference(mlm_prepared, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mlm_reference")
  return completed_run(mlm_args(mlm_prepared, workdir), workdir)


def test_mlm_run_has_no_nsp_metrics_anywhere(mlm_reference):
  workdir, out = mlm_reference
  train_rows, evals = rows(workdir), rows(workdir, "eval")
  assert [r["step"] for r in train_rows] == list(range(1, TOTAL + 1))
  assert [(r["step"], r["seq_len"]) for r in evals] == [(8, 32), (14, 32), (16, 64)]
  for r in train_rows + evals:
    assert not [k for k in r if k.startswith("nsp")], r
    assert r["loss"] == r["mlm_loss"] and np.isfinite(r["mlm_loss"])   # no NSP term
    assert r["mlm_perplexity"] == pytest.approx(np.exp(r["mlm_loss"]), rel=1e-9)
  assert "nsp" not in out and "mlm_ppl" in out
  events = b"".join(p.read_bytes() for p in (workdir / "tensorboard").iterdir())
  assert b"eval/mlm_loss" in events and b"train/mlm_accuracy" in events and b"nsp" not in events


@pytest.mark.slow  # one or two more `bert-jax pretrain` processes
def test_mlm_sigkill_then_rerun_is_bit_exact(mlm_prepared, mlm_reference, tmp_path):
  workdir = tmp_path / "killed"
  _, killed_at, out = kill_past_step_10_and_rerun(mlm_args(mlm_prepared, workdir), workdir)
  resumed = int(out.split("resuming at step ")[1].split()[0])
  assert 8 <= resumed < killed_at
  assert_bit_equal(final_params(workdir), final_params(mlm_reference[0]))
  assert [r["step"] for r in rows(workdir)] == list(range(1, TOTAL + 1))


def test_mlm_export_loads_in_transformers_and_fill_mask_runs(mlm_reference, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from bert_jax import BertForPreTraining, load_pretrained
  from bert_jax.convert import main as convert_main
  workdir = mlm_reference[0]
  assert convert_main(["to-hf", str(workdir), str(tmp_path / "hf")]) == 0
  transformers.BertForPreTraining.from_pretrained(str(tmp_path / "hf"))   # NSP head included
  hf = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "hf")).eval()
  fill = transformers.pipeline("fill-mask", model=hf, tokenizer=str(tmp_path / "hf"))
  answers = fill("the first [MASK] of the season .", top_k=3)
  assert len(answers) == 3 and all(a["token_str"] and a["score"] > 0 for a in answers)
  config, params = load_pretrained(str(workdir))
  enc = fill.tokenizer("the first [MASK] of the season .", return_tensors="np")
  ids = enc["input_ids"].astype(np.int32)
  mlm, _ = BertForPreTraining(config).apply({"params": params}, ids, np.zeros_like(ids),
                                            np.ones_like(ids))
  with torch.no_grad():
    logits = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(mlm), logits, atol=1e-4, rtol=1e-4)
  where = int(np.flatnonzero(ids[0] == fill.tokenizer.mask_token_id)[0])
  assert answers[0]["token"] == int(np.argmax(np.asarray(mlm)[0, where]))


@pytest.mark.parametrize("objective", ["mlm", "mlm_nsp"])
def test_config_and_data_objectives_must_agree(prepared, mlm_prepared, objective, tmp_path,
                                               capsys):
  """Config mlm with MLM + NSP data, and the other way round: one line, exit 2, both named."""
  data = prepared if objective == "mlm" else mlm_prepared   # the other objective's data
  other = "mlm_nsp" if objective == "mlm" else "mlm"
  code = train.main(run_args(data, tmp_path / "w", f"--config.objective={objective}"))
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert err == (f"error: --config.objective={objective}: phase 1 data {data[1][0]} was created "
                 f"for objective {other} (its manifest.json); give data from bert-jax "
                 f"create-data --objective {objective}, or --config.objective={other}")
  assert not rows(tmp_path / "w")


def test_wwm_ext_config_is_one_mlm_phase_at_512_with_whole_words():
  from bert_jax.training.phases import make_phases
  from bert_jax.pretraining.run_config import resolve_config
  repo = pathlib.Path(__file__).resolve().parents[1]
  cfg = resolve_config(str(repo / "configs" / "chinese_wwm_ext.py:v.txt"),
                       [("data.masked_lm_prob", "0.2")])
  phases = make_phases(cfg)
  assert cfg.objective == "mlm" and cfg.data.whole_word_mask and cfg.data.masked_lm_prob == 0.2
  assert [(p.seq_len, p.num_steps) for p in phases] == [(512, cfg.total_steps)]
  assert json.dumps(cfg.to_dict())   # plain values throughout
