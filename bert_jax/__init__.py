"""bert-jax: pretrain BERT the way the paper did, in JAX/Flax."""

from bert_jax.config import BertConfig
from bert_jax.devices import platforms

platforms.skip_absent_accelerators()  # before jax picks its backend

__all__ = ["BertConfig", "BertModel", "BertForPreTraining", "load_pretrained"]
__version__ = "0.1.0"

# Imported on first use: `import bert_jax.tokenizer` stays free of jax, and
# `python -m bert_jax.convert` does not find its module already imported.
_LAZY = {"BertModel": "bert_jax.modeling.model", "BertForPreTraining": "bert_jax.modeling.heads",
         "load_pretrained": "bert_jax.convert"}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'bert_jax' has no attribute {name!r}")
