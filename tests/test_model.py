import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bert_jax import BertForPreTraining, BertModel, load_pretrained
from bert_jax.config import get_preset
from hf_util import padded_batch

CONFIG = get_preset("tiny", vocab_size=120, hidden_size=64, num_attention_heads=2,
                    intermediate_size=128)


@pytest.fixture(scope="module")
def params():
  variables = BertForPreTraining(CONFIG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return nn.unbox(variables["params"])


def test_every_parameter_has_logical_axes():
  variables = jax.eval_shape(BertForPreTraining(CONFIG).init, jax.random.key(0),
                             jnp.zeros((1, 8), jnp.int32))
  specs = nn.get_partition_spec(variables)["params"]
  names = {"batch", "length", "embed", "heads", "kv", "mlp", "vocab", None}
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec)
  shapes = jax.tree_util.tree_leaves(nn.unbox(variables["params"]))
  assert len(flat_specs) == len(shapes) > 30
  for (path, spec), shape in zip(flat_specs, shapes):
    assert is_spec(spec) and len(spec) == len(shape.shape) and set(spec) <= names, path
    # only the 2-way NSP classifier's bias has no axis worth naming
    assert set(spec) != {None} or "seq_relationship" in jax.tree_util.keystr(path), path
  spec = specs["bert"]["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
  assert tuple(spec) == ("embed", "heads", "kv")


def test_bert_initialisation(params):
  word = params["bert"]["embeddings"]["word_embeddings"]["embedding"]
  assert abs(float(word.std()) - 0.02 * 0.88) < 0.003  # truncated at 2 sigma: std 0.88 sigma
  assert float(jnp.abs(word).max()) <= 0.04 + 1e-6
  ln = params["bert"]["encoder"]["layer_0"]["output"]["LayerNorm"]
  assert np.all(ln["scale"] == 1) and np.all(ln["bias"] == 0)


def test_masked_positions_gather_matches_full_logits(params):
  ids, tt, mask = padded_batch(CONFIG.vocab_size)
  full, nsp_full = BertForPreTraining(CONFIG).apply({"params": params}, ids, tt, mask)
  positions = np.array([[1, 3, 5], [0, 2, 8], [1, 2, 3]], np.int32)
  gathered, nsp = BertForPreTraining(CONFIG).apply({"params": params}, ids, tt, mask,
                                                    masked_positions=positions)
  assert full.shape == (3, 12, CONFIG.vocab_size) and gathered.shape == (3, 3, CONFIG.vocab_size)
  np.testing.assert_allclose(gathered, np.take_along_axis(full, positions[..., None], 1),
                             atol=1e-5)
  np.testing.assert_allclose(nsp, nsp_full, atol=1e-6)


def test_padding_invariance(params):
  ids, tt, mask = padded_batch(CONFIG.vocab_size)
  model = BertModel(CONFIG)
  seq, pooled = model.apply({"params": params["bert"]}, ids, tt, mask)
  pad = 20
  ids2 = np.pad(ids, ((0, 0), (0, pad)))
  tt2, mask2 = np.pad(tt, ((0, 0), (0, pad))), np.pad(mask, ((0, 0), (0, pad)))
  seq2, pooled2 = model.apply({"params": params["bert"]}, ids2, tt2, mask2)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(seq2)[:, :12][real], np.asarray(seq)[real], atol=1e-5)
  np.testing.assert_allclose(pooled2, pooled, atol=1e-5)


def test_bfloat16_forward_close_to_float32(params):
  ids, tt, mask = padded_batch(CONFIG.vocab_size)
  seq32, _ = BertModel(CONFIG).apply({"params": params["bert"]}, ids, tt, mask)
  bf16 = CONFIG.replace(dtype="bfloat16")
  seq16, _ = BertModel(bf16).apply({"params": params["bert"]}, ids, tt, mask)
  assert seq16.dtype == jnp.bfloat16
  real = mask.astype(bool)
  err = np.abs(np.asarray(seq16, np.float32) - np.asarray(seq32))[real]
  assert err.mean() < 0.02 and err.max() < 0.15
  mlm16, _ = BertForPreTraining(bf16).apply({"params": params}, ids, tt, mask)
  assert mlm16.dtype == jnp.float32


def test_remat_and_dropout(params):
  ids, tt, mask = padded_batch(CONFIG.vocab_size)
  plain = BertForPreTraining(CONFIG).apply({"params": params}, ids, tt, mask)
  remat = BertForPreTraining(CONFIG.replace(remat=True)).apply({"params": params}, ids, tt, mask)
  np.testing.assert_allclose(remat[0], plain[0], atol=1e-6)
  run = lambda seed: BertForPreTraining(CONFIG).apply(
      {"params": params}, ids, tt, mask, deterministic=False,
      rngs={"dropout": jax.random.key(seed)})[0]
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.allclose(run(1), run(2))
  assert not np.allclose(run(1), plain[0])


def test_minilm_matches_transformers_on_real_sentences(minilm_dir):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config, params = load_pretrained(minilm_dir, verbose=False)
  sentences = ["The quick brown fox jumps over the lazy dog.",
               "BERT was pretrained on BooksCorpus and English Wikipedia, 3.3 billion words.",
               "Padding should not change anything."]
  tok = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
  enc = tok(sentences, padding=True, return_tensors="np")
  hf = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  with torch.no_grad():
    ref = hf(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
  seq, _ = BertModel(config).apply({"params": params["bert"]}, enc["input_ids"],
                                   enc["token_type_ids"], enc["attention_mask"])
  real = enc["attention_mask"].astype(bool)
  assert enc["attention_mask"].min() == 0  # the batch really has padding
  assert np.abs(np.asarray(seq)[real] - ref[real]).max() <= 1e-4



def test_embedding_gradients_are_float32_under_bfloat16_compute():
  """The tables are looked up in float32 and cast after the sum: their gradients (scatter-adds;
  the token-type table's over every position into 2 rows) equal a float64 scatter of the
  LayerNorm's input gradient within 1e-5."""
  from bert_jax.config import BertConfig
  from bert_jax.modeling import ops
  from bert_jax.modeling.model import BertEmbeddings
  config = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, dtype="bfloat16",
                      hidden_dropout_prob=0.0)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 50, size=(8, 64)), jnp.int32)
  types = jnp.asarray(rng.integers(0, 2, size=(8, 64)), jnp.int32)
  module = BertEmbeddings(config)
  params = nn.unbox(module.init(jax.random.PRNGKey(0), ids, types)["params"])
  weight = jnp.asarray(rng.normal(size=(8, 64, 64)), jnp.float32)
  tables = {k: params[k] for k in ("word_embeddings", "token_type_embeddings")}
  grads = jax.grad(lambda t: jnp.sum(
      module.apply({"params": {**params, **t}}, ids, types).astype(jnp.float32) * weight))(tables)

  ln = params["LayerNorm"]
  x = (params["word_embeddings"]["embedding"][ids] + params["position_embeddings"]["embedding"][
      jnp.arange(64)][None] + params["token_type_embeddings"]["embedding"][types])
  g_x = np.asarray(jax.grad(lambda x: jnp.sum(ops.layer_norm(
      x, ln["scale"], ln["bias"], config.layer_norm_eps, "bfloat16").astype(jnp.float32)
      * weight))(x), np.float64).reshape(-1, 64)
  for name, index, size in (("word_embeddings", ids, 50), ("token_type_embeddings", types, 2)):
    ref = np.zeros((size, 64), np.float64)
    np.add.at(ref, np.asarray(index).reshape(-1), g_x)
    got = grads[name]["embedding"]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
