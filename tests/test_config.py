import json

import pytest

from bert_jax.config import BertConfig, PRESETS, get_preset, read_config_json, write_config_json
from bert_jax.errors import UserError


def test_small_bert_grid_and_named_presets():
  for layers in (2, 4, 6, 8, 10, 12):
    for hidden in (128, 256, 512, 768):
      c = PRESETS[f"L-{layers}_H-{hidden}"]
      assert (c.num_hidden_layers, c.hidden_size) == (layers, hidden)
      assert c.num_attention_heads == hidden // 64 and c.intermediate_size == 4 * hidden
  named = {"tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "medium": (8, 512),
           "base": (12, 768), "large": (24, 1024)}
  for name, (layers, hidden) in named.items():
    assert (PRESETS[name].num_hidden_layers, PRESETS[name].hidden_size) == (layers, hidden)
  assert PRESETS["large"].num_attention_heads == 16
  assert PRESETS["chinese-base"].vocab_size == 21128
  assert get_preset("tiny", vocab_size=100).vocab_size == 100


def test_config_json_round_trip_uses_hf_names(tmp_path):
  c = get_preset("mini", vocab_size=1234, dtype="bfloat16")
  path = tmp_path / "config.json"
  write_config_json(c, str(path))
  d = json.loads(path.read_text())
  assert d["model_type"] == "bert" and d["architectures"] == ["BertForPreTraining"]
  assert d["hidden_size"] == 256 and d["vocab_size"] == 1234 and "dtype" not in d
  assert read_config_json(str(path)) == c.replace(dtype="float32")


def test_config_json_errors(tmp_path):
  with pytest.raises(UserError, match="no such file"):
    read_config_json(str(tmp_path / "absent.json"))
  bad = tmp_path / "config.json"
  bad.write_text(json.dumps({"model_type": "gpt2", "vocab_size": 3}))
  with pytest.raises(UserError, match="model_type"):
    read_config_json(str(bad))
  bad.write_text(json.dumps({"hidden_size": 64}))
  with pytest.raises(UserError, match="missing field"):
    read_config_json(str(bad))
  with pytest.raises(UserError, match="divisible"):
    BertConfig(hidden_size=100, num_attention_heads=3)
  with pytest.raises(UserError, match="unknown preset"):
    get_preset("huge")
