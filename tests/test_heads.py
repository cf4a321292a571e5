"""Fine-tuning heads against transformers' PyTorch classes with the same weights."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from bert_jax.config import BertConfig
from bert_jax.convert import params_from_hf, params_to_hf
from bert_jax.modeling import heads
from bert_jax.modeling.model import BertModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=64)


def hf_config(num_labels):
  return transformers.BertConfig(
      vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=128, max_position_embeddings=64, num_labels=num_labels,
      attn_implementation="eager")


def inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, 99, shape).astype(np.int32)
  types = np.zeros(shape, np.int32)
  types[..., shape[-1] // 2:] = 1
  lengths = rng.integers(3, shape[-1] + 1, shape[:-1])
  lengths.reshape(-1)[0] = shape[-1]
  mask = (np.arange(shape[-1]) < lengths[..., None]).astype(np.int32)
  return ids * mask, types * mask, mask  # padded positions hold [PAD]=0


CASES = [  # (flax class, transformers class name, num_labels, input shape)
    (heads.BertForSequenceClassification, "BertForSequenceClassification", 3, (3, 12)),
    (heads.BertForSequenceClassification, "BertForSequenceClassification", 1, (3, 12)),
    (heads.BertForTokenClassification, "BertForTokenClassification", 5, (3, 12)),
    (heads.BertForQuestionAnswering, "BertForQuestionAnswering", 2, (3, 12)),
    (heads.BertForMultipleChoice, "BertForMultipleChoice", 1, (2, 4, 10)),
]


def torch_outputs(model, ids, types, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                token_type_ids=torch.tensor(types, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long))
  if hasattr(out, "start_logits"):
    return out.start_logits.numpy(), out.end_logits.numpy()
  return out.logits.numpy()


@pytest.mark.parametrize("flax_cls,hf_name,num_labels,shape", CASES,
                         ids=[f"{c[1]}-{c[2]}" for c in CASES])
def test_head_matches_transformers_with_flax_weights(flax_cls, hf_name, num_labels, shape):
  ids, types, mask = inputs(shape)
  model = flax_cls(CONFIG, num_labels=num_labels)
  params = nn.unbox(model.init(jax.random.key(1), ids, types, mask)["params"])
  # Give the LayerNorms and biases non-trivial values so that every tensor is exercised.
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(2)
  leaves = [np.asarray(x) + rng.normal(0, 0.02, x.shape).astype(np.float32) for x in leaves]
  params = jax.tree_util.tree_unflatten(treedef, leaves)
  ours = model.apply({"params": params}, ids, types, mask)

  torch_model = getattr(transformers, hf_name)(hf_config(num_labels)).eval()
  state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params_to_hf(params).items()}
  result = torch_model.load_state_dict(state, strict=False)
  assert not result.unexpected_keys
  assert [k for k in result.missing_keys if not k.endswith("position_ids")] == []
  theirs = torch_outputs(torch_model, ids, types, mask)

  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    if a.ndim >= 2 and a.shape[:2] == mask.shape:  # per-token outputs: compare real tokens
      a, b = a[mask.astype(bool)], b[mask.astype(bool)]
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("flax_cls,hf_name,num_labels,shape", CASES[:1] + CASES[3:],
                         ids=["sequence", "qa", "choice"])
def test_transformers_weights_load_into_flax_head(flax_cls, hf_name, num_labels, shape):
  torch.manual_seed(0)
  torch_model = getattr(transformers, hf_name)(hf_config(num_labels)).eval()
  ids, types, mask = inputs(shape, seed=3)
  model = flax_cls(CONFIG, num_labels=num_labels)
  template = nn.unbox(model.init(jax.random.key(0), ids, types, mask)["params"])
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  params, missing, unused = params_from_hf(state, template)
  assert missing == [] and unused == []
  ours = jax.tree_util.tree_leaves(model.apply({"params": params}, ids, types, mask))
  theirs = jax.tree_util.tree_leaves(torch_outputs(torch_model, ids, types, mask))
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-4, rtol=1e-4)


def test_classifier_dropout_only_in_training():
  ids, types, mask = inputs((4, 8))
  model = heads.BertForSequenceClassification(CONFIG.replace(hidden_dropout_prob=0.5,
                                                             attention_probs_dropout_prob=0.0),
                                              num_labels=2)
  params = nn.unbox(model.init(jax.random.key(0), ids, types, mask)["params"])
  eval_a = model.apply({"params": params}, ids, types, mask)
  eval_b = model.apply({"params": params}, ids, types, mask, deterministic=True)
  train = model.apply({"params": params}, ids, types, mask, deterministic=False,
                      rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(eval_a, train)


def test_head_param_names_are_transformers_modules():
  ids, types, mask = inputs((2, 8))
  for cls, head in ((heads.BertForSequenceClassification, "classifier"),
                    (heads.BertForTokenClassification, "classifier"),
                    (heads.BertForQuestionAnswering, "qa_outputs")):
    params = nn.unbox(cls(CONFIG, num_labels=2).init(jax.random.key(0), ids, types, mask)["params"])
    assert set(params) == {"bert", head}
    assert ("pooler" in params["bert"]) == (cls is heads.BertForSequenceClassification)


@pytest.mark.parametrize("remat", [False, True])
def test_pooled_only_encoder_matches_the_full_one_with_gradients(remat):
  """The [CLS] heads' last layer computes the first position only: pooled output and every
  parameter's gradient as the full encoder's (dropout off, where the two are the same math)."""
  config = CONFIG.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, remat=remat)
  ids, types, mask = inputs((3, 12))
  full, first = BertModel(config), BertModel(config, pooled_only=True)
  params = nn.unbox(full.init(jax.random.key(0), ids, types, mask)["params"])

  def pooled(model):
    def loss(p):
      out = model.apply({"params": p}, ids, types, mask, deterministic=False)[1]
      return (out * np.arange(out.shape[-1])).sum(), out
    return jax.value_and_grad(loss, has_aux=True)(params)

  (_, want), want_grads = pooled(full)
  (_, got), got_grads = pooled(first)
  assert first.apply({"params": params}, ids, types, mask)[0].shape == (3, 1, 64)
  np.testing.assert_allclose(got, want, atol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(  # noqa: E731  float32 noise of the tensor
      a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()) + 1e-7)
  jax.tree.map(close, got_grads, want_grads)
