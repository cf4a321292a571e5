"""A functional Flax Linen BERT encoder: params are a plain pytree and `apply` is pure.

The parameter tree mirrors Hugging Face's module names (bert/encoder/layer_0/attention/self/
query/kernel, ...) so that `convert.py` maps it by a name table. Every parameter carries logical
axis names (batch, length, embed, heads, kv, mlp, vocab) that `sharding.py` maps onto a mesh.
Shape suffixes: B batch, T/S query/key length, E hidden, N heads, H head dim, F FFN width.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.config import BertConfig
from bert_jax.modeling import attention, dropout, ops
from bert_jax.modeling.attention import Segments

ACT_FNS = {
    "gelu": ops.gelu,  # BERT's exact erf GELU
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


def kernel_init(config: BertConfig, axes: tuple[str | None, ...]):
  # BERT's create_initializer: truncated normal, stddev of the untruncated distribution.
  return nn.with_logical_partitioning(
      nn.initializers.truncated_normal(config.initializer_range), axes)


def zeros_init(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class LayerNorm(nn.Module):
  """nn.LayerNorm's parameters (scale, bias; logical axis embed) with ops.layer_norm's lean
  backward pass."""
  epsilon: float
  dtype: str
  param_dtype: str

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("embed",)),
                       features, self.param_dtype)
    bias = self.param("bias", zeros_init(("embed",)), features, self.param_dtype)
    return ops.layer_norm(x, scale, bias, self.epsilon, self.dtype)


def layer_norm(config: BertConfig, name: str) -> LayerNorm:
  return LayerNorm(epsilon=config.layer_norm_eps, dtype=config.dtype,
                   param_dtype=config.param_dtype, name=name)


def dense(config: BertConfig, features: int, axes: tuple[str | None, str | None],
          name: str) -> Projection:
  """nn.Dense's parameters (kernel [in, out] with logical axes `axes`, bias on the output
  axis), applied by ops.linear."""
  return Projection(config, (features,), axes, name=name)


class Dropout(nn.Module):
  """Inverted dropout with 16-bit keep decisions from a fused Threefry hash (modeling.dropout).
  Stateless in the "dropout" rng like nn.Dropout, and independent of the mesh."""
  rate: float

  def keep_mask(self, shape: tuple[int, ...]) -> tuple[jax.Array, float]:
    """(boolean mask of the kept elements, the scale of kept values); needs 0 < rate < 1."""
    return dropout.keep_mask(self.key(), shape, self.rate)

  def key(self) -> jax.Array:
    """This dropout's key (what a fused kernel that drops inside itself is given)."""
    return self.make_rng("dropout")

  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    keep, scale = self.keep_mask(x.shape)
    return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


class FirstPositions(NamedTuple):
  """Reads each row's first position ([CLS]); keys and values from the whole row."""

  def queries(self, x_BT):
    return x_BT[:, :1]

  def keys(self, x_BS):
    return x_BS

  def key_mask(self, mask_B11S):
    return mask_B11S


class Packed(NamedTuple):
  """Several sequences per row: each token's position within its sequence and the sequence's
  number (1 + its index, 0 for padding), and where each sequence's [CLS] sits (row, column).
  Attention stays inside a sequence and positions restart, so every sequence's outputs are
  the ones it gets alone in a row of its own. As a readout (a [CLS] head's last layer) it
  reads the Q sequences' first positions, with keys and values from their own rows."""
  position_ids: jax.Array  # [R, P]
  sequence_ids: jax.Array  # [R, P]
  rows: jax.Array  # [Q]
  starts: jax.Array  # [Q]

  def segments(self) -> Segments:
    """Token t attends to s when both belong to one sequence."""
    return Segments(self.sequence_ids, self.sequence_ids)

  def queries(self, x_RP):
    return x_RP[self.rows, self.starts][:, None]

  def keys(self, x_RP):
    return x_RP[self.rows]

  def key_mask(self, _):
    numbers_Q = jnp.arange(1, self.rows.shape[0] + 1, dtype=self.sequence_ids.dtype)
    return (self.sequence_ids[self.rows] == numbers_Q[:, None])[:, None, None, :]


class BertEmbeddings(nn.Module):
  config: BertConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, input_ids_BT, token_type_ids_BT, position_ids_BT=None):
    c = self.config
    # Looked up in the parameter dtype and summed there: the tables' gradients (scatter-adds,
    # the token-type table's over every position into 2 rows) stay float32. LayerNorm then
    # casts to the compute dtype.
    embed = functools.partial(nn.Embed, features=c.hidden_size, dtype=c.param_dtype,
                              param_dtype=c.param_dtype)
    word = embed(c.vocab_size, embedding_init=kernel_init(c, ("vocab", "embed")),
                 name="word_embeddings")
    position = embed(c.max_position_embeddings, embedding_init=kernel_init(c, (None, "embed")),
                     name="position_embeddings")
    token_type = embed(c.type_vocab_size, embedding_init=kernel_init(c, (None, "embed")),
                       name="token_type_embeddings")
    if position_ids_BT is None:
      position_BTE = position(jnp.arange(input_ids_BT.shape[1]))[None]
    else:
      position_BTE = position(position_ids_BT)
    x_BTE = word(input_ids_BT) + position_BTE + token_type(token_type_ids_BT)
    x_BTE = layer_norm(c, "LayerNorm")(x_BTE)
    return Dropout(c.hidden_dropout_prob)(x_BTE, deterministic=self.deterministic)


class Projection(nn.Module):
  """An HF-named linear layer (kernel [in..., out...], bias [out...]) applied by ops.linear.

  Unlike nn.DenseGeneral it never reshapes the kernel parameter, so the kernel's logical axis
  names stay valid under an active mesh (the sharding constraints in the model then apply).
  """
  config: BertConfig
  out_shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  n_in: int = 1  # leading kernel axes contracted with the input's trailing axes

  @nn.compact
  def weights(self, in_shape: tuple[int, ...]):
    c = self.config
    kernel = self.param("kernel", kernel_init(c, self.axes), tuple(in_shape) + self.out_shape,
                        c.param_dtype)
    bias = self.param("bias", zeros_init(self.axes[self.n_in:]), self.out_shape, c.param_dtype)
    return kernel.astype(c.dtype), bias.astype(c.dtype)

  def __call__(self, x):
    kernel, bias = self.weights(x.shape[x.ndim - self.n_in:])
    return ops.add_bias(ops.linear(x.astype(kernel.dtype), kernel, self.n_in), bias)


class BertSelfAttention(nn.Module):
  config: BertConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTE, segments: Segments, readout=None):
    c = self.config
    kernels, biases = zip(*(
        Projection(c, (c.num_attention_heads, c.head_dim), ("embed", "heads", "kv"),
                   name=name).weights((c.hidden_size,))
        for name in ("query", "key", "value")))
    # One fused [E, 3, N, H] matmul instead of three (forward and backward): fewer, larger GEMMs.
    # The GPU kernel reads its [B,T,3,N,H] output in place, adding the bias as it reads, and
    # writes its gradient in place.
    kvq_BT3NH = ops.linear(x_BTE.astype(c.dtype), attention.fuse(*kernels, axis=1), 1)
    bias_3NH = attention.fuse(*biases, axis=0)
    rate = c.attention_probs_dropout_prob
    training = not self.deterministic and rate > 0.0
    if training and rate >= 1.0:
      zeros_BTNH = jnp.zeros_like(kvq_BT3NH[:, :, 0])
      return readout.queries(zeros_BTNH) if readout is not None else zeros_BTNH
    # BERT drops attention probabilities; the fused kernels do it inside themselves.
    key = Dropout(rate).key() if training else None
    if readout is None:
      return attention.attend(kvq_BT3NH, segments, bias_3NH=bias_3NH, rate=rate, key=key,
                              implementation=c.attention)
    q_BTNH, k_BSNH, v_BSNH = attention.queries_keys_values(kvq_BT3NH, bias_3NH)
    q_BTNH, k_BSNH, v_BSNH = readout.queries(q_BTNH), readout.keys(k_BSNH), readout.keys(v_BSNH)
    mask_B11S = readout.key_mask(segments.mask())
    if key is None:
      return ops.attention(q_BTNH, k_BSNH, v_BSNH, mask_B11S)
    b, t, n, _ = q_BTNH.shape
    keep_BNTS, keep_scale = dropout.keep_mask(key, (b, n, t, k_BSNH.shape[1]), rate)
    return ops.dropout_attention(q_BTNH, k_BSNH, v_BSNH, mask_B11S, keep_BNTS, keep_scale)


class BertAttention(nn.Module):
  config: BertConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTE, segments: Segments, readout=None):
    c = self.config
    ctx_BTNH = BertSelfAttention(c, self.deterministic, name="self")(x_BTE, segments, readout)
    residual_BTE = x_BTE if readout is None else readout.queries(x_BTE)
    return BertResidualOutput(c, ("heads", "kv"), self.deterministic, name="output")(
        ctx_BTNH, residual_BTE)


class BertResidualOutput(nn.Module):
  """A projection back to E from `in_axes` (the attention heads, or the FFN's mlp), then
  dropout, residual and post-LN: transformers' BertSelfOutput and BertOutput."""
  config: BertConfig
  in_axes: tuple[str, ...]
  deterministic: bool = True

  @nn.compact
  def __call__(self, h, residual_BTE):
    c = self.config
    y_BTE = Projection(c, (c.hidden_size,), (*self.in_axes, "embed"), n_in=len(self.in_axes),
                       name="dense")(h)
    y_BTE = Dropout(c.hidden_dropout_prob)(y_BTE, deterministic=self.deterministic)
    return layer_norm(c, "LayerNorm")(y_BTE + residual_BTE)


class BertIntermediate(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x_BTE):
    c = self.config
    h_BTF = dense(c, c.intermediate_size, ("embed", "mlp"), "dense")(x_BTE)
    return ACT_FNS[c.hidden_act](h_BTF)


class BertLayer(nn.Module):
  config: BertConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTE, segments: Segments, readout=None):
    """readout (FirstPositions, Packed): the output at its query positions only ([Q, 1, E];
    keys and values still from every position of their rows)."""
    c = self.config
    x_BTE = BertAttention(c, self.deterministic, name="attention")(x_BTE, segments, readout)
    h_BTF = BertIntermediate(c, name="intermediate")(x_BTE)
    x_BTE = BertResidualOutput(c, ("mlp",), self.deterministic, name="output")(h_BTF, x_BTE)
    return nn.with_logical_constraint(x_BTE, ("batch", "length", "embed"))


class BertEncoder(nn.Module):
  """readout: the last layer computes only its positions (all a [CLS] head reads)."""
  config: BertConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTE, segments: Segments, readout=None):
    c = self.config
    # "dots" keeps the projections' and FFN's matmul outputs (no batch dims: not attention's)
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if c.remat == "dots" else None
    layer_cls = nn.remat(BertLayer, policy=policy) if c.remat else BertLayer
    last = c.num_hidden_layers - 1
    for i in range(c.num_hidden_layers):
      x_BTE = layer_cls(c, self.deterministic, name=f"layer_{i}")(
          x_BTE, segments, readout if i == last else None)
    return x_BTE


class BertPooler(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x_BTE):
    c = self.config
    return jnp.tanh(dense(c, c.hidden_size, ("embed", "mlp"), "dense")(x_BTE[:, 0]))


class BertModel(nn.Module):
  """Returns (sequence_output [B,T,E], pooled_output [B,E]), both in the compute dtype. With
  pooled_only the sequence output is the first position's ([B,1,E]): the last layer skips the
  rest (~1/8 of a 6-layer encoder's work; heads that read [CLS] only).

  `packed` (model.Packed) lays several sequences into each row instead of one (attention_mask
  is then unused): the pooled output is per sequence ([Q,E]), and so is the sequence output
  with pooled_only ([Q,1,E]); without it the sequence output stays per row ([R,P,E])."""
  config: BertConfig
  add_pooling_layer: bool = True
  pooled_only: bool = False

  @nn.compact
  def __call__(self, input_ids, token_type_ids=None, attention_mask=None,
               deterministic: bool = True, packed: Packed | None = None):
    c = self.config
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    input_ids = nn.with_logical_constraint(input_ids, ("batch", "length"))
    if packed is not None:
      segments, readout = packed.segments(), packed
    else:
      if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
      segments = Segments(None, (attention_mask != 0).astype(jnp.int32))
      readout = FirstPositions()
    x_BTE = BertEmbeddings(c, deterministic, name="embeddings")(
        input_ids, token_type_ids, None if packed is None else packed.position_ids)
    x_BTE = BertEncoder(c, deterministic, name="encoder")(
        x_BTE, segments, readout if self.pooled_only else None)
    first_BTE = x_BTE if self.pooled_only else readout.queries(x_BTE)
    pooled_BE = BertPooler(c, name="pooler")(first_BTE) if self.add_pooling_layer else None
    return x_BTE, pooled_BE
