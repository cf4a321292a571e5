"""Assembled rows of token ids -> instance records, for both objectives of create-data.

Static masking masks the rows here (`masking.mask_tokens`) and stores the predictions; without
it the rows are stored unmasked (with their word-continuation bits under whole-word masking)
for the input pipeline to mask afresh each epoch. Rows of a vocab that fits 16 bits and
without continuation bits take `records.encode_records`' one-matrix path; others are encoded
one at a time.
"""

from __future__ import annotations

import numpy as np

from bert_jax.data import masking, records
from bert_jax.data.instances import Assembled


def maskable_single_segment(ids_NL: np.ndarray, lengths: np.ndarray, cls_id: int,
                            sep_id: int) -> np.ndarray:
  """[N, L] bool: the real tokens of [CLS] text [SEP] rows other than any [CLS] or [SEP]
  (the [SEP]s between documents included), as the input pipeline's dynamic masking sees them."""
  real_NL = np.arange(ids_NL.shape[1])[None, :] < lengths[:, None]
  return real_NL & (ids_NL != cls_id) & (ids_NL != sep_id)


def to_records(rows: Assembled, is_random_next: np.ndarray, rng: np.random.Generator,
               params: dict, tok, pool: np.ndarray, single_segment: bool = False) -> list[bytes]:
  """The records of `rows` (params: create-data's static_masking, masked_lm_prob and
  max_predictions_per_seq; tok: the ids of [MASK] and the vocab size)."""
  wide = tok.vocab_size > 65535
  lengths, len_a = rows.lengths.tolist(), rows.len_a.tolist()
  labels = is_random_next.tolist()
  out: list[bytes] = []
  if params["static_masking"]:
    m = masking.mask_tokens(rng, rows.ids_NL, rows.maskable_NL, rows.continuation_NL,
                            masked_lm_prob=params["masked_lm_prob"],
                            max_predictions=params["max_predictions_per_seq"],
                            mask_id=tok.mask_id, random_pool=pool)
    counts = m.num_predictions.tolist()
    if not wide:
      return records.encode_records(m.input_ids, rows.lengths, rows.len_a,
                                    m.masked_lm_positions, m.masked_lm_ids, m.num_predictions,
                                    is_random_next, single_segment)
    for n in range(len(lengths)):
      out.append(records.encode_record(m.input_ids[n, :lengths[n]], len_a[n],
                                       m.masked_lm_positions[n, :counts[n]],
                                       m.masked_lm_ids[n, :counts[n]],
                                       labels[n], None, wide, single_segment))
    return out
  if not wide and rows.continuation_NL is None:
    none_NP = np.zeros((len(lengths), 0), np.int32)
    return records.encode_records(rows.ids_NL, rows.lengths, rows.len_a, none_NP, none_NP,
                                  np.zeros(len(lengths), np.int32), is_random_next,
                                  single_segment)
  empty = np.zeros(0, np.int32)
  for n in range(len(lengths)):
    cont = None if rows.continuation_NL is None else rows.continuation_NL[n, :lengths[n]]
    out.append(records.encode_record(rows.ids_NL[n, :lengths[n]], len_a[n], empty, empty,
                                     labels[n], cont, wide, single_segment))
  return out
