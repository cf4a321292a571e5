"""Heads on top of BertModel: pretraining (MLM + NSP) and, below, the fine-tuning heads.

Parameter trees follow transformers' module names (cls/predictions/transform/dense, ...).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bert_jax.config import BertConfig
from bert_jax.modeling import ops
from bert_jax.modeling.model import ACT_FNS, BertModel, Projection, dense, layer_norm, zeros_init


class BertLMPredictionHead(nn.Module):
  """MLM head: transform (dense, act, LayerNorm), then the tied decoder plus an output bias."""
  config: BertConfig

  @nn.compact
  def __call__(self, x_BPE, word_embeddings_VE):
    c = self.config
    x_BPE = MLMTransform(c, name="transform")(x_BPE)
    bias_V = self.param("bias", zeros_init(("vocab",)), (c.vocab_size,), c.param_dtype)
    logits_BPV = ops.unembed(x_BPE, word_embeddings_VE.astype(x_BPE.dtype))
    return ops.add_bias(logits_BPV, bias_V.astype(logits_BPV.dtype))


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


# Fine-tuning heads
# Each applies {"params": {"bert": ..., "classifier" | "qa_outputs": ...}}: the names of
# transformers' modules, so convert.params_to_hf yields exactly their state-dict keys. Dropout
# (hidden_dropout_prob) before the classifier, as transformers. Logits are float32.


def _classifier(config: BertConfig, num_labels: int, name: str = "classifier") -> Projection:
  return dense(config, num_labels, ("embed", None), name)


def _encoder(config: BertConfig, pooled: bool) -> BertModel:
  """The encoder a head reads: with its pooler and only [CLS] from the last layer (`pooled`),
  or every position and no pooler (as transformers)."""
  return BertModel(config, add_pooling_layer=pooled, pooled_only=pooled, name="bert")


def _dropout_classifier(config: BertConfig, num_labels: int, x, deterministic: bool):
  x = nn.Dropout(config.hidden_dropout_prob)(x, deterministic=deterministic)
  return _classifier(config, num_labels)(x).astype(jnp.float32)


class BertForSequenceClassification(nn.Module):
  """[CLS] pooled output -> dropout -> classifier: logits [B, num_labels] (1: regression);
  with `packed` (model.Packed: several sequences per row) one row of logits per sequence."""
  config: BertConfig
  num_labels: int = 2

  @nn.compact
  def __call__(self, input_ids, token_type_ids=None, attention_mask=None,
               deterministic: bool = True, packed=None):
    _, pooled_BE = _encoder(self.config, pooled=True)(input_ids, token_type_ids, attention_mask,
                                                      deterministic, packed)
    return _dropout_classifier(self.config, self.num_labels, pooled_BE, deterministic)


class BertForTokenClassification(nn.Module):
  """Per-token logits [B, T, num_labels]."""
  config: BertConfig
  num_labels: int = 2

  @nn.compact
  def __call__(self, input_ids, token_type_ids=None, attention_mask=None,
               deterministic: bool = True):
    seq_BTE, _ = _encoder(self.config, pooled=False)(input_ids, token_type_ids, attention_mask,
                                                     deterministic)
    return _dropout_classifier(self.config, self.num_labels, seq_BTE, deterministic)


class BertForQuestionAnswering(nn.Module):
  """Span logits: (start [B, T], end [B, T]); qa_outputs is a Dense [E, 2], no dropout."""
  config: BertConfig
  num_labels: int = 2

  @nn.compact
  def __call__(self, input_ids, token_type_ids=None, attention_mask=None,
               deterministic: bool = True):
    c = self.config
    seq_BTE, _ = _encoder(c, pooled=False)(input_ids, token_type_ids, attention_mask,
                                           deterministic)
    logits_BT2 = _classifier(c, self.num_labels, "qa_outputs")(seq_BTE).astype(jnp.float32)
    return logits_BT2[..., 0], logits_BT2[..., 1]


class BertForMultipleChoice(nn.Module):
  """Inputs [B, C, T] are scored as B*C rows; logits [B, C]. `num_labels` is ignored (the
  classifier has one output per choice, as transformers)."""
  config: BertConfig
  num_labels: int = 1

  @nn.compact
  def __call__(self, input_ids, token_type_ids=None, attention_mask=None,
               deterministic: bool = True):
    B, C, T = input_ids.shape
    flat = lambda x: None if x is None else x.reshape(B * C, T)  # noqa: E731
    _, pooled_NE = _encoder(self.config, pooled=True)(
        flat(input_ids), flat(token_type_ids), flat(attention_mask), deterministic)
    return _dropout_classifier(self.config, 1, pooled_NE, deterministic).reshape(B, C)


FINETUNE_HEADS = {
    "BertForSequenceClassification": BertForSequenceClassification,
    "BertForTokenClassification": BertForTokenClassification,
    "BertForQuestionAnswering": BertForQuestionAnswering,
    "BertForMultipleChoice": BertForMultipleChoice,
}
