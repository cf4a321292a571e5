"""Config files and `--config.*` overrides of `bert-jax pretrain`."""

from __future__ import annotations

import os
import pathlib

import pytest

from bert_jax.errors import UserError
from bert_jax.pretraining import run_config, train
from bert_jax.pretraining.workdir import prepare_vocab
from bert_jax.training.phases import make_phases

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load(name: str, *overrides: str):
  spec = str(CONFIGS / name)
  pairs = [tuple(o.split("=", 1)) for o in overrides]
  return run_config.resolve_config(spec, pairs)


@pytest.mark.parametrize("name", ["bert_base_paper.py", "bert_large_paper.py"])
def test_paper_recipe(name):
  c = load(name)
  phases = make_phases(c)
  assert [(p.start_step, p.end_step) for p in phases] == [(0, 900_000), (900_000, 1_000_000)]
  assert [(p.seq_len, p.max_predictions, p.batch_size) for p in phases] == [
      (128, 20, 256), (512, 80, 256)]
  o = c.optim
  assert (o.name, o.learning_rate, o.b1, o.b2, o.eps) == ("adamw", 1e-4, 0.9, 0.999, 1e-6)
  assert (o.weight_decay, o.warmup_steps, o.schedule, o.decay_power) == (
      0.01, 10_000, "continuous", 1.0)
  assert o.bias_correction is False and o.clip_norm == 1.0
  assert c.model.preset == ("base" if "base" in name else "large")
  assert run_config.remat_of(c) == "auto"  # recompute only where a phase would not fit


def test_paper_model_dropout_and_positions():
  from bert_jax.config import get_preset
  for preset in ("base", "large"):
    bc = get_preset(preset)
    assert bc.hidden_dropout_prob == bc.attention_probs_dropout_prob == 0.1
    assert bc.max_position_embeddings == 512


def test_total_steps_override_keeps_proportions():
  c = load("bert_base_paper.py", "total_steps=200")
  phases = make_phases(c)
  assert [(p.start_step, p.end_step) for p in phases] == [(0, 180), (180, 200)]


def test_total_steps_override_scales_warmup(capsys):
  """The paper's 10k-of-1M warmup becomes 1% of the shortened run, and says so; a warmup given
  on the command line is kept."""
  c = load("bert_base_paper.py", "total_steps=20000")
  assert c.optim.warmup_steps == 200
  err = capsys.readouterr().err
  assert "--config.total_steps=20000: warmup scaled" in err and "10000 -> 200" in err
  assert load("bert_base_paper.py", "total_steps=20").optim.warmup_steps == 0
  capsys.readouterr()
  c = load("bert_base_paper.py", "total_steps=20000", "optim.warmup_steps=50")
  assert c.optim.warmup_steps == 50
  assert load("bert_base_paper.py").optim.warmup_steps == 10_000   # no override: untouched
  assert "warmup scaled" not in capsys.readouterr().err
  # NVIDIA's per-phase warmups scale too (2001 of 7038 and 200 of 1563 steps).
  c = load("bert_large_lamb.py", f"total_steps={(7038 + 1563) // 10}")
  p1, p2 = make_phases(c)
  assert (p1.warmup_steps, p2.warmup_steps) == (200, 20)
  assert p1.warmup_steps / p1.num_steps == pytest.approx(2001 / 7038, abs=0.01)


def test_warmup_at_or_past_the_end_is_an_error():
  with pytest.raises(UserError, match=r"warmup_steps=20: at or beyond the end of training "
                                      r"\(total_steps=20\)"):
    load("bert_base_paper.py", "total_steps=20", "optim.warmup_steps=20")
  load("bert_base_paper.py", "total_steps=20", "optim.warmup_steps=19")
  with pytest.raises(UserError, match=r"phases.1.warmup_steps=200: at or beyond the end of "
                                      "phase 2"):
    load("bert_large_lamb.py", "total_steps=1000", "phases.1.warmup_steps=200")


def test_lamb_recipe():
  c = load("bert_large_lamb.py")
  p1, p2 = make_phases(c)
  assert (p1.num_steps, p2.num_steps) == (7038, 1563)
  assert (p1.batch_size, p2.batch_size) == (65536, 32768)
  assert (p1.seq_len, p2.seq_len) == (128, 512)
  assert (p1.learning_rate, p2.learning_rate) == (6e-3, 4e-3)
  assert (p1.warmup_steps, p2.warmup_steps) == (2001, 200)   # 0.2843 x 7038, 0.128 x 1563
  assert p1.grad_accum > 1 and p2.grad_accum > 1
  assert p1.batch_size % p1.grad_accum == 0 and p2.batch_size % p2.grad_accum == 0
  assert (c.optim.name, c.optim.schedule) == ("lamb", "per_phase")


def test_chinese_base_takes_vocab_argument(tmp_path):
  c = load("chinese_base.py:/some/vocab.txt")
  assert c.data.vocab == "/some/vocab.txt" and c.data.whole_word_mask
  assert c.model.preset == "chinese-base"
  with pytest.raises(UserError, match="needs a vocab"):
    prepare_vocab(load("chinese_base.py"), str(tmp_path), True)


def test_tiny_cpu_languages():
  assert list(load("tiny_cpu.py").data.input) == ["sample:en"]
  zh = load("tiny_cpu.py:zh")
  assert list(zh.data.input) == ["sample:zh"] and zh.data.whole_word_mask
  with pytest.raises(UserError, match="tiny_cpu.py:fr"):
    load("tiny_cpu.py:fr")


def test_overrides_parse_to_field_types():
  c = load("tiny_cpu.py", "total_steps=1e3", "phases.1.batch_size=4", "optim.learning_rate=2e-4",
           "checkpoint.async_save=false", "data.input=a.txt,b.txt", "model.overrides.num_hidden_layers=1",
           "model.overrides={'hidden_dropout_prob': 0.0}", "phases.0.data=/x")
  assert c.total_steps == 1000 and isinstance(c.total_steps, int)
  assert c.phases[1]["batch_size"] == 4 and c.phases[0]["data"] == "/x"
  assert c.optim.learning_rate == 2e-4
  assert c.checkpoint.async_save is False
  assert list(c.data.input) == ["a.txt", "b.txt"]
  assert dict(c.model.overrides) == {"hidden_dropout_prob": 0.0}


@pytest.mark.parametrize("words, remat", [
    ((), "auto"), (("model.remat=True",), True), (("model.remat=off",), False),
    (("model.remat=AUTO",), "auto"), (("model.remat=dots",), "dots")])
def test_remat_is_true_false_or_auto(words, remat):
  got = run_config.remat_of(load("tiny_cpu.py", *words))
  assert got == remat and type(got) is type(remat)


@pytest.mark.parametrize("base", ["common", "own"])
def test_a_config_file_may_set_remat_to_a_bool(tmp_path, base):
  """common.py's remat is "auto", a string; a user's file built on it, or on a ConfigDict of its
  own, may still say True, and the command line may still say auto."""
  own = tmp_path / "own.py"
  build = ("  c = common['base_config']()\n  c.model.remat = True\n" if base == "common" else
           "  d = common['base_config']().to_dict()\n  d['model']['remat'] = True\n"
           "  c = ml_collections.ConfigDict(d)\n")  # a bool-typed field
  own.write_text(f"import runpy, ml_collections\n"
                 f"common = runpy.run_path({str(CONFIGS / 'common.py')!r})\n"
                 f"def get_config(arg=None):\n{build}  return c\n")
  c = run_config.resolve_config(str(own), [])
  assert run_config.remat_of(c) is True
  assert run_config.remat_of(run_config.resolve_config(str(own), [("model.remat", "auto")])) \
      == "auto"


def test_list_literal_override():
  c = load("tiny_cpu.py", "data.input=['x.txt', 'y.txt']",
           "phases=[{'fraction': 1.0, 'seq_len': 64, 'max_predictions': 10, 'batch_size': 2}]")
  assert list(c.data.input) == ["x.txt", "y.txt"]
  assert [p.seq_len for p in make_phases(c)] == [64]


@pytest.mark.parametrize("flag, message", [
    ("--config.total_stepz=5", "--config.total_stepz: no such config field"),
    ("--config.total_steps=abc", "--config.total_steps='abc': expected an integer"),
    ("--config.total_steps=2.5", "expected an integer"),
    ("--config.optim.learning_rate=fast", "--config.optim.learning_rate='fast': expected a number"),
    ("--config.checkpoint.async_save=maybe", "expected true or false"),
    ("--config.phases.5.batch_size=8", "--config.phases.5.batch_size: index 5 out of range"),
    ("--config.phases.0.batch_sise=8", "--config.phases.0.batch_sise: no such config field"),
    ("--config.model.overrides.hidden_sise=8", "not a BertConfig field"),
    ("--config.nan_policy=ignore", "--config.nan_policy='ignore'"),
    ("--config.phases.0.grad_accum=5", "grad_accum=5"),
    ("--config.total_steps.x=1", "is a int, not a group"),
    ("--config.phases=[dict(a=1)]", "expected a Python literal"),
    ("--config.phases=['a']", "expected a list of dicts"),
    ("--config.model.remat=sometimes",
     "--config.model.remat='sometimes': expected true, false, dots or auto"),
    ("--config.optim.decay_from=middle", "--config.optim.decay_from='middle': expected 'zero'"),
    ("--config.optim.warmup_steps=800", "warmup_steps=800: at or beyond the end of training"),
])
def test_bad_overrides_exit_2(tmp_path, capsys, flag, message):
  code = train.main(["--config", str(CONFIGS / "tiny_cpu.py"), "--workdir", str(tmp_path / "w"),
                     flag])
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and message in err and "\n" not in err
  assert not (tmp_path / "w").exists()   # nothing written for a bad command line


def test_bad_config_file_exit_2(tmp_path, capsys):
  assert train.main(["--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)]) == 2
  assert "nope.py: no such file" in capsys.readouterr().err
  bad = tmp_path / "bad.py"
  bad.write_text("x = 1\n")
  assert train.main(["--config", str(bad), "--workdir", str(tmp_path)]) == 2
  assert "defines no get_config" in capsys.readouterr().err
  assert train.main(["--config", str(CONFIGS / "tiny_cpu.py"), "--workdir", str(tmp_path),
                     "--bogus"]) == 2
  assert "--bogus" in capsys.readouterr().err


def test_config_loads_from_any_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = run_config.load_config_file(str(CONFIGS / "bert_large_paper.py"))
  assert c.model.preset == "large"


def test_unwritable_workdir_exits_2_before_any_work(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  for workdir, reason in ((blocker / "run", f"{blocker} is a file, not a directory"),
                          ("/proc/bert-jax-run", "cannot write in /proc")):
    assert train.main(["--config", str(CONFIGS / "tiny_cpu.py"), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --workdir {workdir}: {reason}" or (
        err.startswith(f"error: --workdir {workdir}: {reason}") and "\n" not in err), err
  assert os.listdir(tmp_path) == ["a_file"]
