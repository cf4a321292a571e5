"""python -m bert_jax.finetune end to end on tiny models: outputs, export round trips into
transformers, bad input (exit 2, one line), and a real MiniLM fine-tune on SST-2 (slow)."""

from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from bert_jax.finetune.__main__ import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# float32 by name: tests compare with transformers and across meshes at float noise, which the
# default (auto) would not give on a host with bfloat16 units (AMX, AVX-512 BF16).
TINY = ["--init", "random", "--preset", "L-2_H-128", "--epochs", "1", "--batch-size", "8",
        "--max-seq-length", "32", "--learning-rate", "1e-3", "--quiet", "--dtype", "float32"]


@pytest.fixture(scope="module")
def vocab(minilm_dir):
  return str(minilm_dir / "vocab.txt")


def sst2_slice(shared_data, tmp_path, n_train, n_dev):
  lines = (shared_data / "glue" / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()
  dev = (shared_data / "glue" / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()
  train_p, dev_p = tmp_path / "train.tsv", tmp_path / "dev.tsv"
  train_p.write_text("\n".join(lines[:n_train + 1]) + "\n", encoding="utf-8")
  dev_p.write_text("\n".join(dev[:n_dev + 1]) + "\n", encoding="utf-8")
  return str(train_p), str(dev_p)


def hf_logits(model_dir, texts, pairs=None):
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  enc = tok(texts, pairs, padding=True, truncation=True, max_length=32, return_tensors="pt")
  return enc


def load_hf(auto_cls, model_dir):
  model, info = getattr(transformers, auto_cls).from_pretrained(
      model_dir, output_loading_info=True)
  assert info["missing_keys"] == [] or set(info["missing_keys"]) <= set()
  assert not info["unexpected_keys"] and not info["mismatched_keys"]
  return model.eval()


def test_classification_outputs_and_export(shared_data, tmp_path, vocab):
  train, dev = sst2_slice(shared_data, tmp_path, 96, 40)
  out, hf_dir = tmp_path / "out", tmp_path / "hf"
  assert main(["--task", "classification", "--vocab", vocab, "--train-file", train,
               "--validation-file", dev, "--output-dir", str(out), "--export-hf", str(hf_dir),
               *TINY, "--eval-batch-size", "16"]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert {"accuracy", "f1", "mcc", "validation_loss"} <= set(metrics)
  assert 0 <= metrics["accuracy"] <= 1
  rows = list(csv.DictReader((out / "predictions.tsv").open(), delimiter="\t"))
  assert len(rows) == 40 and rows[0]["line"] == "2"
  accuracy = np.mean([r["prediction"] == r["label"] for r in rows])
  assert accuracy == pytest.approx(metrics["accuracy"])
  assert (out / "best" / "params").is_dir() and (out / "best" / "finetune.json").is_file()

  config = json.loads((hf_dir / "config.json").read_text())
  assert config["architectures"] == ["BertForSequenceClassification"]
  assert config["id2label"] == {"0": "0", "1": "1"} and config["num_labels"] == 2
  model = load_hf("AutoModelForSequenceClassification", str(hf_dir))
  texts = [line.split("\t")[0] for line in pathlib.Path(dev).read_text().splitlines()[1:]]
  enc = hf_logits(str(hf_dir), texts)
  with torch.no_grad():
    torch_logits = model(**enc).logits.numpy()
  assert [config["id2label"][str(i)] for i in torch_logits.argmax(-1)] == \
      [r["prediction"] for r in rows]
  # The validation loss, summed over packed eval batches of 16 sequences (the last one short)
  # and made a mean once, is the mean cross-entropy of the whole set.
  labels = torch.tensor([int(r["label"]) for r in rows])
  reference = torch.nn.functional.cross_entropy(torch.from_numpy(torch_logits), labels).item()
  assert metrics["validation_loss"] == pytest.approx(reference, rel=1e-4, abs=1e-5)
  # The Flax model on the same ids gives the same logits.
  from bert_jax.convert import load_pretrained
  from bert_jax.modeling import heads
  cfg, params = load_pretrained(out / "best")
  ours = heads.BertForSequenceClassification(cfg, num_labels=2).apply(
      {"params": params}, enc["input_ids"].numpy(), enc["token_type_ids"].numpy(),
      enc["attention_mask"].numpy())
  np.testing.assert_allclose(np.asarray(ours), torch_logits, atol=1e-4, rtol=1e-4)


CONLL_TRAIN = "\n\n".join(["EU B-ORG\nrejects O\nGerman B-MISC\ncall O",
                           "Peter B-PER\nBlackburn I-PER",
                           "BRUSSELS B-LOC\n1996-08-22 O",
                           "The O\nEuropean B-ORG\nCommission I-ORG\nsaid O"] * 6) + "\n"
CONLL_DEV = "Peter B-PER\nsaid O\n\nEU B-ORG\nrejects O\nBRUSSELS B-LOC\n"


@pytest.mark.slow  # another task's fine-tune + export
def test_token_task_and_export(tmp_path, vocab):
  (tmp_path / "train.conll").write_text(CONLL_TRAIN)
  (tmp_path / "dev.conll").write_text(CONLL_DEV)
  out, hf_dir = tmp_path / "out", tmp_path / "hf"
  assert main(["--task", "token", "--vocab", vocab, "--train-file", str(tmp_path / "train.conll"),
               "--validation-file", str(tmp_path / "dev.conll"), "--output-dir", str(out),
               "--export-hf", str(hf_dir), *TINY, "--epochs", "3"]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert {"precision", "recall", "f1", "accuracy"} <= set(metrics)
  lines = [l.split("\t") for l in (out / "predictions.tsv").read_text().splitlines() if l]
  assert [l[0] for l in lines] == ["Peter", "said", "EU", "rejects", "BRUSSELS"]
  config = json.loads((hf_dir / "config.json").read_text())
  model = load_hf("AutoModelForTokenClassification", str(hf_dir))
  tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  enc = tok([["Peter", "said"], ["EU", "rejects", "BRUSSELS"]], is_split_into_words=True,
            padding=True, return_tensors="pt")
  with torch.no_grad():
    pred = model(**enc).logits.argmax(-1).numpy()
  torch_tags = []
  for i in range(2):
    words, seen = enc.word_ids(i), set()
    for pos, w in enumerate(words):
      if w is not None and w not in seen:
        seen.add(w)
        torch_tags.append(config["id2label"][str(pred[i, pos])])
  assert torch_tags == [l[2] for l in lines]


@pytest.mark.slow  # a fine-tune + two exports
def test_to_hf_exports_a_finetuned_best_with_its_head(tmp_path, vocab):
  """A fine-tune's best/ used to be refused by to-hf ("a fine-tuned checkpoint"), so an export
  forgotten or cut short by a kill could only be had by training again."""
  from safetensors.numpy import load_file

  from bert_jax.convert import main as convert_main
  (tmp_path / "train.conll").write_text(CONLL_TRAIN)
  out, hf_dir, later = tmp_path / "out", tmp_path / "hf", tmp_path / "later"
  assert main(["--task", "token", "--vocab", vocab, "--train-file", str(tmp_path / "train.conll"),
               "--validation-file", str(tmp_path / "train.conll"), "--output-dir", str(out),
               "--export-hf", str(hf_dir), *TINY]) == 0
  assert convert_main(["to-hf", str(out / "best"), str(later)]) == 0
  assert json.loads((later / "config.json").read_text()) == \
      json.loads((hf_dir / "config.json").read_text())
  a, b = load_file(str(hf_dir / "model.safetensors")), load_file(str(later / "model.safetensors"))
  assert a.keys() == b.keys() and "classifier.weight" in a
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert (later / "vocab.txt").read_bytes() == (hf_dir / "vocab.txt").read_bytes()


def test_export_hf_location_is_checked_before_any_training(tmp_path, vocab, capsys):
  """--export-hf equal to --output-dir used to be refused only after training."""
  (tmp_path / "train.conll").write_text(CONLL_TRAIN)
  out = tmp_path / "out"
  common = ["--task", "token", "--vocab", vocab, "--train-file", str(tmp_path / "train.conll"),
            "--validation-file", str(tmp_path / "train.conll"), "--output-dir", str(out), *TINY]
  for export, where in ((out, "is"), (out / "hf", "is inside"), (tmp_path, "contains")):
    assert main([*common, "--export-hf", str(export)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --export-hf {export}: {where} --output-dir {out}; expected a "
                   "directory of its own"), err
  assert not out.exists()


def _sigterm_at_call(monkeypatch, n):
  """The process sends itself SIGTERM during its `n`-th train step (as a preemption would)."""
  import os
  import signal

  from bert_jax.training import steps
  make, calls = steps.jit_train_step, {"n": 0}

  def with_signal(*args, **kwargs):
    fn = make(*args, **kwargs)

    def step(*a):
      calls["n"] += 1
      if calls["n"] == n:
        os.kill(os.getpid(), signal.SIGTERM)
      return fn(*a)
    return step
  monkeypatch.setattr(steps, "jit_train_step", with_signal)


def _tree_bytes(root):
  return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow  # two fine-tunes
def test_sigterm_marks_the_output_incomplete_and_a_finished_one_is_never_overwritten(
    tmp_path, vocab, monkeypatch, capsys):
  """SIGTERM used to leave the files of a finished run; and a rerun on a finished --output-dir
  replaced its model, metrics and predictions without a word."""
  from bert_jax.finetune.outputs import EXIT_STOPPED
  (tmp_path / "train.conll").write_text(CONLL_TRAIN)
  out, hf_dir = tmp_path / "out", tmp_path / "hf"
  base = ["--task", "token", "--vocab", vocab, "--train-file", str(tmp_path / "train.conll"),
          "--validation-file", str(tmp_path / "train.conll"), "--output-dir", str(out), *TINY,
          "--epochs", "2", "--eval-every", "1"]
  args = [*base, "--export-hf", str(hf_dir)]
  with monkeypatch.context() as m:
    _sigterm_at_call(m, 2)
    assert main(args) == EXIT_STOPPED
  metrics = json.loads((out / "metrics.json").read_text())
  assert (metrics["status"], metrics["stopped_at_step"], metrics["total_steps"]) == \
      ("incomplete", 2, 6)
  assert (out / "best" / "params").is_dir() and not hf_dir.exists()   # the best so far; no export
  assert "stopped at step 2 of 6" in capsys.readouterr().err
  # The same command again replaces the stopped run's output and finishes it.
  assert main(args) == 0
  assert "replacing an incomplete run (stopped at step 2 of 6)" in capsys.readouterr().err
  assert json.loads((out / "metrics.json").read_text())["status"] == "complete"
  assert (hf_dir / "model.safetensors").is_file()
  # Once more: the finished output is refused and left byte for byte as it was.
  finished = _tree_bytes(out)
  other_hf = tmp_path / "hf2"
  assert main([*base, "--export-hf", str(other_hf)]) == 2
  assert capsys.readouterr().err.strip() == (
      f"error: --output-dir {out}: holds a finished fine-tuning run (metrics.json, best/, "
      "predictions); give --overwrite-output-dir to replace it, or choose another --output-dir")
  assert _tree_bytes(out) == finished and not other_hf.exists()


@pytest.mark.slow  # about a minute on a busy 2-core CPU
def test_qa_task_and_export(shared_data, tmp_path):
  data = json.loads((shared_data / "cmrc2018" / "cmrc2018_trial.json").read_text("utf-8"))
  small = {"version": "v1", "data": data["data"][:2]}
  path = tmp_path / "cmrc.json"
  path.write_text(json.dumps(small, ensure_ascii=False), encoding="utf-8")
  vocab_zh = str(shared_data / "vocab" / "bert-base-chinese-vocab.txt")
  out, hf_dir = tmp_path / "out", tmp_path / "hf"
  args = [a for a in TINY if a not in ("32",)]
  args[args.index("--max-seq-length") + 1:args.index("--max-seq-length") + 1] = ["128"]
  assert main(["--task", "qa", "--vocab", vocab_zh, "--train-file", str(path),
               "--validation-file", str(path), "--output-dir", str(out), "--doc-stride", "48",
               "--export-hf", str(hf_dir), *args]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert 0 <= metrics["exact_match"] <= 100 and 0 <= metrics["f1"] <= 100
  assert all(h["validation_loss"] > 0 for h in metrics["history"])
  predictions = json.loads((out / "predictions.json").read_text("utf-8"))
  ids = {q["id"] for a in small["data"] for p in a["paragraphs"] for q in p["qas"]}
  assert set(predictions) == ids
  contexts = [p["context"] for a in small["data"] for p in a["paragraphs"]]
  assert all(any(answer in c for c in contexts) for answer in predictions.values())
  load_hf("AutoModelForQuestionAnswering", str(hf_dir))


SWAG = ("video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,ending1,ending2,ending3,"
        "label\n" + "".join(f"v{i},{i},x,The cat {i}.,It,gold,sat.,ran.,ate.,slept.,{i % 4}\n"
                             for i in range(16)))


@pytest.mark.slow  # another task's fine-tune + export
def test_choice_task_and_export(tmp_path, vocab):
  (tmp_path / "swag.csv").write_text(SWAG)
  out, hf_dir = tmp_path / "out", tmp_path / "hf"
  assert main(["--task", "choice", "--vocab", vocab, "--train-file", str(tmp_path / "swag.csv"),
               "--validation-file", str(tmp_path / "swag.csv"), "--output-dir", str(out),
               "--export-hf", str(hf_dir), *TINY]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  rows = list(csv.DictReader((out / "predictions.tsv").open(), delimiter="\t"))
  assert len(rows) == 16
  assert metrics["accuracy"] == pytest.approx(np.mean([r["prediction"] == r["label"] for r in rows]))
  model = load_hf("AutoModelForMultipleChoice", str(hf_dir))
  tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  first = [f"The cat {i}." for i in range(16) for _ in range(4)]
  second = [f"It {e}" for _ in range(16) for e in ("sat.", "ran.", "ate.", "slept.")]
  enc = tok(first, second, padding=True, return_tensors="pt")
  with torch.no_grad():
    pred = model(**{k: v.view(16, 4, -1) for k, v in enc.items()}).logits.argmax(-1)
  assert pred.tolist() == [int(r["prediction"]) for r in rows]
  with torch.no_grad():
    reference = model(**{k: v.view(16, 4, -1) for k, v in enc.items()},
                      labels=torch.tensor([i % 4 for i in range(16)])).loss.item()
  assert metrics["validation_loss"] == pytest.approx(reference, rel=1e-4, abs=1e-5)


# -- bad input -------------------------------------------------------------------------------

def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "bert_jax.finetune", *args],
                        capture_output=True, text=True, timeout=300)


def assert_user_error(result, *fragments):
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  for fragment in fragments:
    assert fragment in lines[0]


def test_bad_input_exits_2(tmp_path, vocab, minilm_dir, shared_data):
  good = tmp_path / "good.tsv"
  good.write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
  empty = tmp_path / "empty.tsv"
  empty.write_text("")
  unknown = tmp_path / "unknown.tsv"
  unknown.write_text("sentence\tlabel\nfine\t1\nodd\t7\n")
  nolabel = tmp_path / "nolabel.tsv"
  nolabel.write_text("sentence\tstars\ngood\t1\n")
  common = ["--task", "classification", "--output-dir", str(tmp_path / "o"), *TINY]
  assert_user_error(run_cli(*common, "--vocab", vocab, "--train-file", str(empty),
                            "--validation-file", str(good)), "empty.tsv", "empty")
  assert_user_error(run_cli(*common, "--vocab", vocab, "--train-file", str(good),
                            "--validation-file", str(unknown)), "unknown.tsv:3", "'7'")
  assert_user_error(run_cli(*common, "--vocab", vocab, "--train-file", str(good),
                            "--validation-file", str(good), "--label-column", "gold"),
                    "good.tsv", "gold")
  assert_user_error(run_cli(*common, "--train-file", str(good), "--validation-file", str(good)),
                    "--vocab")
  assert_user_error(run_cli(*common, "--vocab", vocab, "--train-file", str(good),
                            "--validation-file", str(good), "--task", "token", "--packing"),
                    "--packing", "token")
  zh_vocab = str(shared_data / "vocab" / "bert-base-chinese-vocab.txt")
  assert_user_error(run_cli("--task", "classification", "--init", str(minilm_dir), "--vocab",
                            zh_vocab, "--train-file", str(good), "--validation-file", str(good),
                            "--output-dir", str(tmp_path / "o")), "21128", "30522")


def test_unwritable_output_exits_2_in_seconds_before_training(tmp_path, vocab):
  """Checked before anything is loaded: the trained model used to be lost at the very end."""
  good = tmp_path / "good.tsv"
  good.write_text("sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(40)))
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  common = ["--task", "classification", "--vocab", vocab, "--train-file", str(good),
            "--validation-file", str(good), *TINY]
  cases = [(["--output-dir", str(blocker / "out")], "--output-dir", "is a file"),
           (["--output-dir", "/proc/bert-jax-out"], "--output-dir", "cannot write in /proc"),
           (["--output-dir", str(tmp_path / "o"), "--export-hf", str(blocker / "hf")],
            "--export-hf", "is a file")]
  for args, flag, reason in cases:
    started = time.monotonic()
    result = run_cli(*common, *args)
    assert_user_error(result, flag, reason)
    assert time.monotonic() - started < 30, "not before training"
    assert "fine-tune" not in result.stderr
  assert not (tmp_path / "o" / "metrics.json").exists()


def test_second_run_on_one_output_dir_is_refused(tmp_path, vocab):
  """A live process's lock (here a sleeping child's) refuses the run, naming pid and host."""
  import socket
  out = tmp_path / "out"
  out.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    (out / ".bert-jax.lock").write_text(json.dumps(
        {"pid": holder.pid, "host": socket.gethostname(), "started": "earlier"}))
    good = tmp_path / "good.tsv"
    good.write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    result = run_cli("--task", "classification", "--vocab", vocab, "--train-file", str(good),
                     "--validation-file", str(good), "--output-dir", str(out), *TINY)
    assert_user_error(result, "--output-dir", f"in use by pid {holder.pid} on host "
                      f"{socket.gethostname()}")
  finally:
    holder.kill()
    holder.wait()
  assert not (out / "metrics.json").exists()


# -- real weights ----------------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_sst2_beats_majority_class(shared_data, tmp_path, minilm_dir):
  train, dev = sst2_slice(shared_data, tmp_path, 2000, 1000)
  out = tmp_path / "out"
  assert main(["--task", "classification", "--init", str(minilm_dir), "--train-file", train,
               "--validation-file", dev, "--output-dir", str(out), "--epochs", "1",
               "--batch-size", "32", "--max-seq-length", "64", "--learning-rate", "1e-4",
               "--quiet"]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  labels = [l.split("\t")[1] for l in pathlib.Path(dev).read_text().splitlines()[1:]]
  majority = max(labels.count("0"), labels.count("1")) / len(labels)
  print(f"SST-2 dev accuracy {metrics['accuracy']:.4f} (majority class {majority:.4f})")
  assert metrics["accuracy"] > majority + 0.15


def _finetune_processes(train, dev, vocab, out, devices, mesh="", processes=1, extra=()):
  """Runs python -m bert_jax.finetune as `processes` processes of `devices` host devices each
  (jax.distributed over localhost when several); returns (train losses, best params)."""
  import os
  import socket
  from bert_jax.convert import load_pretrained
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  procs = []
  for pid in range(processes):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
                 JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "bert_jax.finetune", "--task", "classification", "--vocab", vocab,
         "--train-file", train, "--validation-file", dev, "--output-dir", str(out), *TINY,
         "--batch-size", "16", "--max-seq-length", "16", "--eval-every", "1",
         "--learning-rate", "1e-4", "--mesh", mesh, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
  for proc in procs:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
  history = json.loads((out / "metrics.json").read_text())["history"]
  return [h["train_loss"] for h in history], load_pretrained(out / "best")[1]


def _assert_same_run(a, b, loss_atol=1e-5, param_atol=2e-5):
  import jax
  np.testing.assert_allclose(a[0], b[0], atol=loss_atol, rtol=0)
  for x, y in zip(jax.tree_util.tree_leaves(a[1]), jax.tree_util.tree_leaves(b[1])):
    np.testing.assert_allclose(x, y, atol=param_atol)


@pytest.mark.slow  # about two minutes on a busy 2-core CPU
def test_fsdp_mesh_matches_data_parallel(shared_data, tmp_path, vocab):
  """8 host devices: fsdp 4 (parameters and optimizer state sharded, each batch over data x
  fsdp) gives the losses of plain data parallelism over 8, step by step, with accumulation."""
  train, dev = sst2_slice(shared_data, tmp_path, 64, 16)
  runs = [_finetune_processes(train, dev, vocab, tmp_path / name, 8, mesh,
                              extra=("--gradient-accumulation", "2"))
          for name, mesh in (("data8", "data=8"), ("fsdp4", "data=2,fsdp=4"))]
  assert len(runs[0][0]) == 2  # two updates, one train loss each
  _assert_same_run(*runs)


@pytest.mark.slow  # two fine-tuning processes
def test_rerun_loads_its_compiled_steps_from_the_cache(shared_data, tmp_path, vocab):
  """--compilation-cache: the first run writes its compiled steps; a rerun with the same shapes
  (another output dir) compiles nothing new and trains the same."""
  train, dev = sst2_slice(shared_data, tmp_path, 32, 16)
  cache = tmp_path / "cache"
  extra = ("--compilation-cache", str(cache))
  first = _finetune_processes(train, dev, vocab, tmp_path / "a", 1, extra=extra)
  entries = sorted(p.name for p in cache.iterdir())
  assert any(name.startswith("jit_") for name in entries), entries
  second = _finetune_processes(train, dev, vocab, tmp_path / "b", 1, extra=extra)
  assert sorted(p.name for p in cache.iterdir()) == entries
  _assert_same_run(first, second, loss_atol=0, param_atol=0)


@pytest.mark.slow  # about two minutes on a busy 2-core CPU
def test_two_processes_match_one(shared_data, tmp_path, vocab):
  """Two processes of one device each (jax.distributed, gloo) feed half of every batch; the run
  is the one of one process with both devices."""
  train, dev = sst2_slice(shared_data, tmp_path, 48, 16)
  one = _finetune_processes(train, dev, vocab, tmp_path / "one", 2)
  two = _finetune_processes(train, dev, vocab, tmp_path / "two", 1, processes=2)
  _assert_same_run(one, two)


@pytest.mark.slow  # about a minute on a busy 2-core CPU
def test_random_init_of_any_size_from_a_config_json(tmp_path, vocab):
  """--init random --preset config.json: the assignment's not-pretrained model of its own size
  (4 layers x 32 here), trained with the cosine schedule."""
  from bert_jax.config import read_config_json
  config = tmp_path / "config.json"
  config.write_text(json.dumps({"model_type": "bert", "vocab_size": 2, "hidden_size": 32,
                                "num_hidden_layers": 4, "num_attention_heads": 2,
                                "intermediate_size": 64, "max_position_embeddings": 64}))
  rows = [{"sentence": f"it is {w}", "label": str(i % 2)}
          for i, w in enumerate(["good", "bad", "fine", "awful"] * 4)]
  path = tmp_path / "rows.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  out = tmp_path / "out"
  args = [a for a in TINY if a not in ("L-2_H-128",)]
  args[args.index("--preset") + 1:args.index("--preset") + 1] = [str(config)]
  assert main(["--task", "classification", "--vocab", vocab, "--train-file", str(path),
               "--validation-file", str(path), "--output-dir", str(out), "--lr-schedule",
               "cosine", *args]) == 0
  trained = read_config_json(str(out / "best" / "config.json"))
  assert (trained.num_hidden_layers, trained.hidden_size) == (4, 32)
  assert trained.vocab_size == sum(1 for _ in open(vocab, encoding="utf-8"))


def test_regression_with_accumulation_and_export(tmp_path, vocab):
  rng = np.random.default_rng(0)
  words = ["good", "bad", "fine", "awful", "great", "poor"]
  rows = []
  for _ in range(40):
    a, b = rng.choice(words, 2)
    rows.append({"sentence1": f"it is {a}", "sentence2": f"it was {b}",
                 "score": f"{rng.uniform(0, 5):.2f}"})
  path = tmp_path / "sts.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  out, hf_dir = tmp_path / "out", tmp_path / "hf"
  assert main(["--task", "classification", "--vocab", vocab, "--train-file", str(path),
               "--validation-file", str(path), "--output-dir", str(out), "--export-hf",
               str(hf_dir), "--gradient-accumulation", "2", *TINY]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert {"pearson", "spearman"} <= set(metrics) and "accuracy" not in metrics
  config = json.loads((hf_dir / "config.json").read_text())
  assert config["problem_type"] == "regression" and config["num_labels"] == 1
  model = load_hf("AutoModelForSequenceClassification", str(hf_dir))
  enc = hf_logits(str(hf_dir), [r["sentence1"] for r in rows], [r["sentence2"] for r in rows])
  with torch.no_grad():
    torch_scores = model(**enc).logits[:, 0].numpy()
  predicted = [float(l.split("\t")[1])
               for l in (out / "predictions.tsv").read_text().splitlines()[1:]]
  np.testing.assert_allclose(predicted, torch_scores, atol=1e-4, rtol=1e-4)


def test_attention_and_remat_flags_change_the_path_not_the_result(shared_data, tmp_path, vocab,
                                                                   capfd):
  """--attention pallas (interpreted on this CPU; auto takes it on GPUs and TPUs) and --remat on
  train and evaluate packed classification rows as the default XLA path does: the same dropout
  bits, the same validation loss to float noise."""
  train, dev = sst2_slice(shared_data, tmp_path, 16, 8)
  losses, logs = {}, {}
  for name, flags in [("xla", ["--attention", "xla"]), ("pallas", ["--attention", "pallas"]),
                      ("remat", ["--attention", "xla", "--remat", "on"])]:
    out = tmp_path / name
    assert main(["--task", "classification", "--vocab", vocab, "--train-file", train,
                 "--validation-file", dev, "--output-dir", str(out), *TINY, *flags]) == 0
    losses[name] = json.loads((out / "metrics.json").read_text())["validation_loss"]
    logs[name] = capfd.readouterr().err
  assert losses["pallas"] == pytest.approx(losses["xla"], rel=1e-5)
  assert losses["remat"] == pytest.approx(losses["xla"], rel=1e-5)
  assert "training fused Pallas kernel (attention dropout 0.1 inside" in logs["pallas"]
  assert "training unfused XLA" in logs["xla"] and "remat" not in logs["xla"]
  assert "remat on: each layer recomputed" in logs["remat"]
