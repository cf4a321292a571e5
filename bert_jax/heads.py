"""Heads on top of BertModel: pretraining (MLM + NSP) and, below, the fine-tuning heads.

Parameter trees follow transformers' module names (cls/predictions/transform/dense, ...).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bert_jax.config import BertConfig
from bert_jax.model import ACT_FNS, BertModel, dense, layer_norm, zeros_init


class BertLMPredictionHead(nn.Module):
  """MLM head: transform (dense, act, LayerNorm), then the tied decoder plus an output bias."""
  config: BertConfig

  @nn.compact
  def __call__(self, x_BPE, word_embeddings_VE):
    c = self.config
    x_BPE = MLMTransform(c, name="transform")(x_BPE)
    bias_V = self.param("bias", zeros_init(("vocab",)), (c.vocab_size,), c.param_dtype)
    logits_BPV = jnp.einsum("bpe,ve->bpv", x_BPE, word_embeddings_VE.astype(x_BPE.dtype))
    return logits_BPV + bias_V.astype(logits_BPV.dtype)


class MLMTransform(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = ACT_FNS[c.hidden_act](dense(c, c.hidden_size, ("embed", "mlp"), "dense")(x))
    return layer_norm(c, "LayerNorm")(x)


def gather_positions(x_BTE, positions_BP):
  """x at the given positions of each row: [B,T,E], [B,P] -> [B,P,E]."""
  return jnp.take_along_axis(x_BTE, positions_BP[..., None].astype(jnp.int32), axis=1)


class BertPreTrainingHeads(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, seq_BTE, pooled_BE, word_embeddings_VE, masked_positions_BP):
    c = self.config
    if masked_positions_BP is not None:
      # Gather before the vocabulary projection (as the original BERT): the MLM head is most of
      # a small model's FLOPs when it runs at every position.
      seq_BTE = gather_positions(seq_BTE, masked_positions_BP)
    mlm_logits = BertLMPredictionHead(c, name="predictions")(seq_BTE, word_embeddings_VE)
    nsp_logits = dense(c, 2, ("embed", None), "seq_relationship")(pooled_BE)
    return mlm_logits.astype(jnp.float32), nsp_logits.astype(jnp.float32)


class BertForPreTraining(nn.Module):
  """Returns (mlm_logits [B,P,V] or [B,T,V], nsp_logits [B,2]) in float32."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids=None, attention_mask=None,
               masked_positions=None, deterministic: bool = True):
    bert = BertModel(self.config, name="bert")
    seq_BTE, pooled_BE = bert(input_ids, token_type_ids, attention_mask, deterministic)
    word_embeddings_VE = nn.unbox(
        bert.variables["params"]["embeddings"]["word_embeddings"]["embedding"])
    return BertPreTrainingHeads(self.config, name="cls")(
        seq_BTE, pooled_BE, word_embeddings_VE, masked_positions)
