"""Google TF1 checkpoints: the reader/writer (tf1.py) and from-tf / to-tf / load_pretrained,
against a checkpoint and outputs written by google-research/bert's own TF code."""

import pathlib
import shutil

import jax
import numpy as np
import pytest

from bert_jax import BertForPreTraining, BertModel, load_pretrained, tf1
from bert_jax.convert import main


@pytest.fixture(scope="module")
def tf_dir(shared_data) -> pathlib.Path:
  path = shared_data / "tf1-bert-tiny"
  if not (path / "bert_model.ckpt.index").is_file():
    pytest.skip(f"{path} is absent")
  return path


def _outputs(config, params, ref):
  ids, tt, mask = ref["input_ids"], ref["token_type_ids"], ref["input_mask"]
  mlm, nsp = BertForPreTraining(config).apply(
      {"params": params}, ids, tt, mask, masked_positions=ref["masked_lm_positions"],
      deterministic=True)
  seq, pooled = BertModel(config).apply({"params": params["bert"]}, ids, tt, mask,
                                        deterministic=True)
  return {"sequence_output": seq, "pooled_output": pooled,
          "masked_lm_log_probs": jax.nn.log_softmax(mlm),
          "next_sentence_log_probs": jax.nn.log_softmax(nsp)}


def _max_errors(config, params, ref) -> dict[str, float]:
  return {k: float(np.abs(np.asarray(v) - ref[k]).max())
          for k, v in _outputs(config, params, ref).items()}


def test_from_tf_matches_the_tf_reference_outputs(tf_dir, tmp_path, capsys):
  ref = np.load(tf_dir / "reference_outputs.npz")
  assert main(["from-tf", str(tf_dir), str(tmp_path / "ckpt")]) == 0
  assert "ignored" not in capsys.readouterr().err  # every bert/ and cls/ variable was used
  assert (tmp_path / "ckpt" / "vocab.txt").read_text() == (tf_dir / "vocab.txt").read_text()
  config, params = load_pretrained(tmp_path / "ckpt")
  assert config.hidden_act == "gelu_new"  # google-research/bert's gelu is the tanh form
  errors = _max_errors(config, params, ref)
  assert max(errors.values()) < 2e-5, errors
  # The exact erf GELU is a different model: the tanh mapping is what makes it match.
  assert _max_errors(config.replace(hidden_act="gelu"), params, ref)["sequence_output"] > 1e-4


def test_load_pretrained_reads_the_tf_directory_directly(tf_dir):
  config, params = load_pretrained(tf_dir)
  errors = _max_errors(config, params, np.load(tf_dir / "reference_outputs.npz"))
  assert max(errors.values()) < 2e-5, errors


def test_optimizer_slots_and_global_step_are_skipped(tf_dir):
  _, entries = tf1.read_index(tf_dir / "bert_model.ckpt.index")
  slots = [n for n in entries if n.endswith(("/adam_m", "/adam_v"))]
  assert slots and "global_step" in entries
  model = tf1.read_tensors(tf_dir / "bert_model.ckpt", tf1.is_model_variable)
  assert set(model) == {n for n in entries if n not in slots and n != "global_step"}
  assert all(n.startswith(("bert/", "cls/")) for n in model)


def test_writer_reproduces_tensorflows_bytes(tf_dir, tmp_path):
  """Every tensor, with its slots: the data file is byte-identical to TensorFlow's and the index
  holds the same entries (dtype, shape, offset, size, crc32c)."""
  tensors = tf1.read_tensors(tf_dir / "bert_model.ckpt")
  tf1.write_tensors(tmp_path / "x", tensors)
  assert ((tmp_path / "x.data-00000-of-00001").read_bytes()
          == (tf_dir / "bert_model.ckpt.data-00000-of-00001").read_bytes())
  assert tf1.read_index(tmp_path / "x.index") == tf1.read_index(tf_dir / "bert_model.ckpt.index")
  assert tensors["global_step"].shape == () and tensors["global_step"].dtype == np.int64


def test_to_tf_round_trip(tf_dir, tmp_path):
  assert main(["from-tf", str(tf_dir), str(tmp_path / "ckpt")]) == 0
  assert main(["to-tf", str(tmp_path / "ckpt"), str(tmp_path / "tf")]) == 0
  back = tf1.read_tensors(tmp_path / "tf" / "bert_model.ckpt")
  orig = tf1.read_tensors(tf_dir / "bert_model.ckpt", tf1.is_model_variable)
  assert set(back) == set(orig)
  assert all(np.array_equal(back[k], orig[k]) for k in orig)
  assert '"hidden_act": "gelu"' in (tmp_path / "tf" / "bert_config.json").read_text()
  config, params = load_pretrained(tmp_path / "tf")
  errors = _max_errors(config, params, np.load(tf_dir / "reference_outputs.npz"))
  assert max(errors.values()) < 2e-5, errors


def _damaged_copy(tf_dir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  d = tmp_path / "damaged"
  shutil.copytree(tf_dir, d)
  for f in d.iterdir():
    f.chmod(0o644)
  return d


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "truncated"), ("flip", "crc32c"), ("no-index", "bert_model.ckpt.index"),
    ("no-data", "data file is missing"), ("bad-index", "not a readable TF checkpoint index")])
def test_damaged_checkpoint_one_line_exit_2(tf_dir, tmp_path, capsys, damage, expected):
  d = _damaged_copy(tf_dir, tmp_path)
  data, index = d / "bert_model.ckpt.data-00000-of-00001", d / "bert_model.ckpt.index"
  if damage == "truncate":
    data.write_bytes(data.read_bytes()[:-1000])
  elif damage == "flip":
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1   # inside bert/embeddings/LayerNorm/beta, a model variable
    data.write_bytes(bytes(raw))
  elif damage == "no-index":
    index.unlink()
  elif damage == "no-data":
    data.unlink()
  else:
    index.write_bytes(index.read_bytes()[:-10])
  assert main(["from-tf", str(d), str(tmp_path / "ckpt")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
  assert not (tmp_path / "ckpt").exists()


def test_not_a_tf_directory(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert main(["from-tf", str(tmp_path / "empty"), str(tmp_path / "ckpt")]) == 2
  assert "bert_config.json" in capsys.readouterr().err


def test_table_and_names_without_shared_data(tmp_path):
  """The writer and reader agree on every dtype and shape, and TF <-> HF names invert."""
  tensors = {"bert/a/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
             "global_step": np.array(7, np.int64), "x/half": np.ones((4,), np.float16),
             "bert/z": np.zeros((0,), np.float32)}
  tf1.write_tensors(tmp_path / "m", tensors)
  back = tf1.read_tensors(tmp_path / "m")
  assert set(back) == set(tensors)
  for k, v in tensors.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v)
  for name in ("bert/encoder/layer_11/attention/self/query/kernel",
               "bert/embeddings/word_embeddings", "bert/pooler/dense/bias",
               "bert/encoder/layer_3/output/LayerNorm/gamma", "cls/predictions/output_bias",
               "cls/seq_relationship/output_weights", "cls/predictions/transform/LayerNorm/beta"):
    x = np.ones((2, 3), np.float32)
    key, y = tf1.tf_to_hf(name, x)
    assert tf1.hf_to_tf(key, y)[0] == name and np.array_equal(tf1.hf_to_tf(key, y)[1], x)
  assert tf1.tf_to_hf("bert/encoder/layer_11/attention/self/query/kernel", x)[0] == \
      "bert.encoder.layer.11.attention.self.query.weight"
