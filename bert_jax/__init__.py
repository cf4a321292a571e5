"""bert-jax: pretrain BERT the way the paper did, in JAX/Flax."""

from bert_jax.config import BertConfig
from bert_jax.heads import BertForPreTraining
from bert_jax.model import BertModel

__all__ = ["BertConfig", "BertModel", "BertForPreTraining", "load_pretrained"]
__version__ = "0.1.0"


def __getattr__(name):
  # Lazy, so that `python -m bert_jax.convert` does not find its module already imported.
  if name == "load_pretrained":
    from bert_jax.convert import load_pretrained
    return load_pretrained
  raise AttributeError(f"module 'bert_jax' has no attribute {name!r}")
