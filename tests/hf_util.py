"""Random-initialised transformers models saved to disk, for parity tests."""

from __future__ import annotations

import numpy as np

TINY = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=96, max_position_embeddings=64)


def save_random_hf(cls_name: str, out_dir, seed: int = 0, **overrides):
  import torch
  import transformers
  torch.manual_seed(seed)
  model = getattr(transformers, cls_name)(transformers.BertConfig(**{**TINY, **overrides}))
  model.eval().save_pretrained(str(out_dir))
  return model


def padded_batch(vocab_size: int, seed: int = 0):
  """ids, token types (both segments) and a padding mask with ragged rows."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(5, vocab_size, (3, 12)).astype(np.int32)
  token_types = np.zeros_like(ids)
  token_types[:, 6:] = 1
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  mask[2, 4:] = 0
  ids[mask == 0] = 0
  return ids, token_types, mask
