import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from bert_jax import BertForPreTraining, load_pretrained
from bert_jax.config import get_preset
from bert_jax.convert import init_pretraining_params, main, read_hf_state_dict, write_hf_dir
from bert_jax.storage.checkpoint import write_checkpoint
from hf_util import padded_batch, save_random_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _torch_logits(model, ids, tt, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(tt),
                attention_mask=torch.tensor(mask))
  return out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()


def _write_vocab(path: pathlib.Path, n: int) -> str:
  tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(n - 5)]
  path.write_text("".join(t + "\n" for t in tokens))
  return str(path)


def test_from_hf_logits_match_pytorch(tmp_path, capsys):
  hf_dir = tmp_path / "hf"
  model = save_random_hf("BertForPreTraining", hf_dir)
  _write_vocab(hf_dir / "vocab.txt", 99)
  assert main(["from-hf", str(hf_dir), str(tmp_path / "ckpt")]) == 0
  assert (tmp_path / "ckpt" / "vocab.txt").read_text() == (hf_dir / "vocab.txt").read_text()
  config, params = load_pretrained(tmp_path / "ckpt")
  ids, tt, mask = padded_batch(config.vocab_size)
  mlm, nsp = BertForPreTraining(config).apply({"params": params}, ids, tt, mask)
  ref_mlm, ref_nsp = _torch_logits(model, ids, tt, mask)
  real = mask.astype(bool)
  assert np.abs(np.asarray(mlm)[real] - ref_mlm[real]).max() <= 1e-4
  assert np.abs(np.asarray(nsp) - ref_nsp).max() <= 1e-4


def test_masked_lm_checkpoint_gets_fresh_nsp_head(tmp_path, capsys):
  save_random_hf("BertForMaskedLM", tmp_path / "hf")
  config, params = load_pretrained(tmp_path / "hf")
  err = capsys.readouterr().err
  assert "cls.seq_relationship.weight" in err and "initialised" in err
  assert "cls.predictions.transform.dense.weight" not in err
  assert params["cls"]["seq_relationship"]["kernel"].shape == (config.hidden_size, 2)


def test_round_trips_are_exact(tmp_path):
  config = get_preset("tiny", vocab_size=99, hidden_size=64, num_attention_heads=4)
  ours = init_pretraining_params(config, seed=3)
  # ours -> HF -> ours, bit-exact
  write_checkpoint(tmp_path / "ckpt", config, ours, _write_vocab(tmp_path / "vocab.txt", 99))
  assert main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
  config2, back = load_pretrained(tmp_path / "hf")
  assert config2 == config
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, ours)
  # HF -> ours -> HF reproduces every tensor
  hf_model = save_random_hf("BertForPreTraining", tmp_path / "hf0", seed=1)
  _write_vocab(tmp_path / "hf0" / "vocab.txt", 99)
  assert main(["from-hf", str(tmp_path / "hf0"), str(tmp_path / "ckpt1")]) == 0
  assert main(["to-hf", str(tmp_path / "ckpt1"), str(tmp_path / "hf1")]) == 0
  original = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  written, _ = read_hf_state_dict(tmp_path / "hf1")
  for name, tensor in written.items():
    np.testing.assert_array_equal(tensor, original[name], err_msg=name)
  skipped = {k for k in original if k not in written}
  assert skipped <= {"bert.embeddings.position_ids", "cls.predictions.decoder.weight",
                     "cls.predictions.decoder.bias"}


def test_to_hf_loads_in_transformers_with_tokenizer_and_fill_mask(tmp_path, minilm_dir):
  assert main(["from-hf", str(minilm_dir), str(tmp_path / "ckpt")]) == 0
  config, params = load_pretrained(tmp_path / "ckpt")
  # a bfloat16-trained model is still written in float32
  params16 = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), params)
  write_hf_dir(tmp_path / "hf", config, params16, vocab_path=str(tmp_path / "ckpt" / "vocab.txt"),
               lower_case=True)
  hf_dir = str(tmp_path / "hf")
  model, info = transformers.BertForPreTraining.from_pretrained(hf_dir, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert all(p.dtype == torch.float32 for p in model.parameters())
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  ref = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
  text = "Héllo WORLD, this is bert-jax!"
  assert tok(text)["input_ids"] == ref(text)["input_ids"]
  fill = transformers.pipeline("fill-mask", model=hf_dir, tokenizer=hf_dir)
  assert len(fill("Paris is the [MASK] of France.")) == 5
  # and the exported model computes what ours does
  ids, tt, mask = padded_batch(config.vocab_size)
  mlm, nsp = BertForPreTraining(config).apply(
      {"params": jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params16)},
      ids, tt, mask)
  ref_mlm, ref_nsp = _torch_logits(model.eval(), ids, tt, mask)
  assert np.abs(np.asarray(mlm)[mask.astype(bool)] - ref_mlm[mask.astype(bool)]).max() <= 1e-4


def test_transformers5_dir_with_only_tokenizer_json(tmp_path, minilm_dir):
  hf = tmp_path / "hf"
  shutil.copytree(minilm_dir, hf)
  (hf / "vocab.txt").unlink()
  assert main(["from-hf", str(hf), str(tmp_path / "ckpt")]) == 0
  assert (tmp_path / "ckpt" / "vocab.txt").read_text().splitlines() == \
      (minilm_dir / "vocab.txt").read_text().splitlines()


def test_pytorch_bin_is_read_with_weights_only_loader(tmp_path):
  model = save_random_hf("BertForPreTraining", tmp_path / "st")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  shutil.copy(tmp_path / "st" / "config.json", bin_dir)
  torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
  _, a = load_pretrained(tmp_path / "st")
  _, b = load_pretrained(bin_dir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "bert_jax.convert", *args], capture_output=True,
                        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_bad_input_one_line_exit_2_nothing_written(tmp_path):
  not_bert = tmp_path / "notbert"
  not_bert.mkdir()
  (not_bert / "readme.txt").write_text("hi")
  r = _cli("from-hf", str(not_bert), str(tmp_path / "out1"))
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "notbert" in r.stderr
  assert not (tmp_path / "out1").exists()
  # a config that disagrees with the weights
  save_random_hf("BertForPreTraining", tmp_path / "hf")
  cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  cfg["intermediate_size"] = 128
  (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
  r = _cli("from-hf", str(tmp_path / "hf"), str(tmp_path / "out2"))
  assert r.returncode == 2 and r.stderr.count("\n") == 1
  assert "model.safetensors" in r.stderr and "intermediate.dense" in r.stderr
  assert not (tmp_path / "out2").exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out2")]
  r = _cli("to-hf", str(tmp_path / "nowhere"), str(tmp_path / "out3"))
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nowhere" in r.stderr


def test_damaged_newest_checkpoint_falls_back(tmp_path, capsys):
  config = get_preset("tiny", vocab_size=99, hidden_size=64, num_attention_heads=4)
  workdir = tmp_path / "work"
  for step, seed in ((10, 0), (20, 1)):
    write_checkpoint(workdir / "checkpoints" / str(step), config,
                     init_pretraining_params(config, seed))
  shutil.copy(workdir / "checkpoints" / "10" / "config.json", workdir / "config.json")
  for f in (workdir / "checkpoints" / "20" / "params").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"garbage")
  _, params = load_pretrained(workdir)
  err = capsys.readouterr().err
  assert "using the one before" in err and err.count("\n") == 1   # no asyncio tracebacks
  # The warning names the damaged file (not a Python object's repr).
  assert f"warning: {workdir / 'checkpoints' / '20' / 'params'}: cannot restore (" in err
  assert "object at 0x" not in err and "bound method" not in err and "tensorstore_spec" not in err
  jax.tree_util.tree_map(np.testing.assert_array_equal, params,
                         init_pretraining_params(config, 0))


def test_written_directories_follow_the_umask(tmp_path):
  """to-hf / --export-hf (and from-hf) used to leave 0700 directories and 0600 files."""
  config = get_preset("tiny", vocab_size=99, hidden_size=64, num_attention_heads=4)
  params = init_pretraining_params(config, 0)
  vocab = _write_vocab(tmp_path / "vocab.txt", 99)
  old = os.umask(0o022)
  try:
    write_hf_dir(tmp_path / "hf", config, params, vocab_path=vocab, lower_case=True)
    write_checkpoint(tmp_path / "ckpt", config, params, vocab)
  finally:
    os.umask(old)
  for root in (tmp_path / "hf", tmp_path / "ckpt"):
    assert root.stat().st_mode & 0o777 == 0o755
    for path in root.rglob("*"):
      assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
  assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_unwritable_output_is_refused_before_loading(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  r = _cli("to-hf", str(tmp_path / "nowhere"), str(blocker / "hf"))
  assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
  assert f"to-hf HF_DIR {blocker / 'hf'}: {blocker} is a file" in r.stderr   # before the input
  save_random_hf("BertForPreTraining", tmp_path / "hf")
  r = _cli("from-hf", str(tmp_path / "hf"), "/proc/bert-jax-ckpt")
  assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
  assert "from-hf CKPT_DIR /proc/bert-jax-ckpt: cannot write in /proc" in r.stderr
