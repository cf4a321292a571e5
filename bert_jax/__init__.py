"""bert-jax: pretrain BERT the way the paper did, in JAX/Flax."""

from bert_jax.config import BertConfig
from bert_jax.heads import BertForPreTraining
from bert_jax.model import BertModel
from bert_jax.convert import load_pretrained

__all__ = ["BertConfig", "BertModel", "BertForPreTraining", "load_pretrained"]
__version__ = "0.1.0"
