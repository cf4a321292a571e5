"""Attention without [B,N,T,S] tensors in memory: a flash-attention Pallas kernel with BERT's
attention dropout inside it (`flash.py`), cuDNN's flash attention (GPU) and TPU splash
attention where nothing is dropped, and the choice between them and the unfused XLA path
(`ops.attention` / `ops.dropout_attention`).

Which keys a query sees is given by segment ids: query t attends key s when
q_seg[t] == kv_seg[s] and kv_seg[s] != 0. A padded batch is q_seg = 1, kv_seg = its attention
mask; packed rows (model.Packed) give each sequence its own number, padding 0. A query that sees
no key gets the mean of all values, as the XLA path's softmax over all-masked logits gives.

Dropout in the kernel draws the very bits `dropout.keep_mask` draws for the [B,N,T,S]
probabilities (the same Threefry counters, hashed inside the forward kernel instead of written
out as a mask, and kept packed, 1 or 2 bits per element, for the backward kernels), so
the fused and unfused paths train identically for a given key; the bits of an element depend
on its global (b, n, t, s), whatever the mesh.

The kernel is chosen by the platform of the mesh the step is traced under (`target_platform`),
so `bert-jax plan` compiles the TPU path on any host. With attention dropout (the paper's
recipe) `auto` takes the Pallas kernel on TPUs (Mosaic) and GPUs (Triton): both compile here
(`bert-jax plan --topology v5e:2x2|h200:1`) and are checked in interpret mode, and before a run
trains through a compiled kernel, `kernel_check.verify` runs it once on the device at the run's
lengths against the XLA path with the same bits (a kernel that differs stops the run, naming
`attention=xla`). Without dropout (the fast recipe, configs/bert_base_fast.py) they take
splash attention and cuDNN.
cuDNN reads a padding mask as lengths: padding at the end, as every batch made here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bert_jax.config import ATTENTIONS
from bert_jax.errors import UserError
from bert_jax.modeling import dropout, flash, ops

IMPLEMENTATIONS = ATTENTIONS
_ONLY_ON = {"splash": ("tpu", "TPUs"), "cudnn": ("gpu", "NVIDIA GPUs")}  # the Pallas kernel: any
_MIN_BLOCK = 16  # Triton's smallest dot operand side


class Segments(NamedTuple):
  """Segment ids of the queries [B, T] (None: all 1) and keys [B, S]."""
  q_BT: jax.Array | None
  kv_BS: jax.Array

  def mask(self) -> jax.Array:
    """The boolean mask of the XLA path: [B, 1, 1, S] for a padded batch, else [B, 1, T, S]."""
    kv = self.kv_BS[:, None, None, :]
    if self.q_BT is None:
      return kv != 0
    return (self.q_BT[:, None, :, None] == kv) & (kv != 0)

  def queries(self, t: int) -> jax.Array:
    return jnp.ones((self.kv_BS.shape[0], t), jnp.int32) if self.q_BT is None else self.q_BT


# ----------------------------------------------------------------------------- choice

def target_platform() -> str:
  """The platform of the mesh being traced under (a TPU topology's in `bert-jax plan`), else
  jax's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def choose(implementation: str, platform: str, rate: float, training: bool,
           shape: tuple[int, int, int], dtype: str = "bfloat16", packed: bool = False) -> str:
  """The path one attention call takes: "xla", "pallas", "splash" or "cudnn". `shape` is
  (T, S, H). "auto" fuses where a kernel fits: with attention dropout the Pallas kernel (on
  TPUs and GPUs; kernel_check.verify runs it on the device before a run trains through it),
  without it splash on TPUs and cuDNN on GPUs (16-bit, padded rows; the Pallas kernel for
  packed rows and float32); the XLA path elsewhere. A kernel asked for by name runs where it
  fits, and the XLA path takes the calls it does not (a [CLS] readout; packed rows for cuDNN),
  as the run's log says (`describe`); splash off a TPU, cuDNN off a GPU, or either with
  dropout, is a UserError."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}: expected one of "
                     f"{', '.join(IMPLEMENTATIONS)}")
  t, s, h = shape
  dropping = training and rate > 0.0
  power_of_two = lambda x: x >= _MIN_BLOCK and x & (x - 1) == 0
  # The dropout counters need power-of-two lengths; TPU blocks are whole 128-key tiles with any
  # head width, Triton's are powers of two throughout.
  fits_pallas = power_of_two(t) and power_of_two(s) and (
      t % 128 == 0 and s % 128 == 0 if platform == "tpu" else power_of_two(h))
  fits_splash = t % 128 == 0 and s % 128 == 0
  fits_cudnn = dtype in ("bfloat16", "float16") and not packed and h <= 128 and h % 8 == 0
  fits = dict(pallas=fits_pallas, splash=fits_splash, cudnn=fits_cudnn, xla=True)
  if implementation == "auto":
    if platform not in ("gpu", "tpu"):
      return "xla"
    fast = "splash" if platform == "tpu" else "cudnn"
    implementation = "pallas" if dropping or not fits[fast] else fast
  elif implementation in _ONLY_ON and platform != _ONLY_ON[implementation][0]:
    raise UserError(f"attention {implementation} runs on {_ONLY_ON[implementation][1]} only, "
                    f"not on this {platform}: use attention=auto (or xla)")
  elif implementation in _ONLY_ON and dropping:
    raise UserError(f"attention {implementation} has no dropout: set "
                    "attention_probs_dropout_prob=0 (the fast recipe) or attention=auto")
  return implementation if fits[implementation] else "xla"


def describe(implementation: str, platform: str, rate: float, dtype: str = "bfloat16",
             packed: bool = False) -> str:
  """One line for a run's log: the attention path training takes at full length, and its
  dropout."""
  train, evaluate = (choose(implementation, platform, rate, training, (128, 128, 64), dtype,
                            packed) for training in (True, False))
  where = {"pallas": "fused Pallas kernel", "splash": "fused splash kernel",
           "cudnn": "fused cuDNN kernel", "xla": "unfused XLA"}
  if rate > 0.0:
    drop = (f"attention dropout {rate} inside the kernel" if train == "pallas"
            else f"attention dropout {rate} on materialised probabilities")
  else:
    drop = "no attention dropout"
  return (f"attention on {platform}: training {where[train]} ({drop}), evaluation "
          f"{where[evaluate]}")


def fuse(q, k, v, axis: int):
  """q, k and v stacked along a new `axis` in the fused projection's order (keys, values,
  queries: the order in which the kernel writes their gradients, flash.KEYS)."""
  parts = {flash.QUERIES: q, flash.KEYS: k, flash.VALUES: v}
  return jnp.stack([parts[i] for i in range(3)], axis=axis)


def queries_keys_values(kvq_BT3NH, bias_3NH=None):
  """q [B,T,N,H], k and v [B,S,N,H] of the fused projection [B,T,3,N,H] (see `fuse`) plus its
  bias [3,N,H] where given. One split: its gradient is one concatenate, where three slices'
  would be three pads and adds."""
  if bias_3NH is not None:
    kvq_BT3NH = ops.add_bias(kvq_BT3NH, bias_3NH)
  parts = [x[:, :, 0] for x in jnp.split(kvq_BT3NH, 3, axis=2)]
  return parts[flash.QUERIES], parts[flash.KEYS], parts[flash.VALUES]


def attend(kvq_BT3NH, segments: Segments, *, bias_3NH=None, rate: float = 0.0,
           key: jax.Array | None = None, implementation: str = "auto"):
  """softmax(q·k/sqrt(H) over the keys `segments` allows) · v of the fused projection
  [B,T,3,N,H] (see `fuse`) plus its bias [3,N,H] where given, with inverted dropout of the
  probabilities at `rate` when `key` is given: [B,T,N,H]."""
  _, t, _, n, h = kvq_BT3NH.shape
  training = key is not None and rate > 0.0
  path = choose(implementation, target_platform(), rate, training, (t, t, h),
                jnp.dtype(kvq_BT3NH.dtype).name, segments.q_BT is not None)
  if path == "pallas":
    words = dropout.key_words_of(key) if training else jnp.zeros((2,), jnp.uint32)
    # On a CPU (attention="pallas" asked for by name: tests) the kernel runs interpreted.
    return flash_attention(kvq_BT3NH, segments.queries(t), segments.kv_BS, words,
                           bias_3NH=bias_3NH, rate=rate if training else 0.0,
                           interpret=target_platform() == "cpu")
  q_BTNH, k_BSNH, v_BSNH = queries_keys_values(kvq_BT3NH, bias_3NH)
  if path == "splash":
    return _splash(q_BTNH, k_BSNH, v_BSNH, segments)
  if path == "cudnn":
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSNH, v_BSNH, implementation="cudnn",
        key_value_seq_lengths=jnp.sum(segments.kv_BS != 0, axis=1, dtype=jnp.int32))
  mask = segments.mask()
  if not training:
    return ops.attention(q_BTNH, k_BSNH, v_BSNH, mask)
  keep, scale = dropout.keep_mask(key, (q_BTNH.shape[0], n, t, t), rate)
  return ops.dropout_attention(q_BTNH, k_BSNH, v_BSNH, mask, keep, scale)


# ----------------------------------------------------------------------------- sharding

def _batch_head_specs(b: int, n: int):
  """Mesh axes for the batch and head dimensions inside shard_map: the rules' (data, fsdp)
  and tensor where they divide the dimension, else replicated."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return mesh, (), ()
  batch = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
  batch = batch if batch and b % math.prod(mesh.shape[a] for a in batch) == 0 else ()
  heads = ("tensor",) if "tensor" in mesh.shape and n % mesh.shape["tensor"] == 0 else ()
  return mesh, batch, heads


def _axis_offset(axes: tuple[str, ...], local: int):
  return jax.lax.axis_index(axes) * local if axes else 0


def flash_attention(kvq_BT3NH, q_seg_BT, kv_seg_BS, words, *, bias_3NH=None,
                    rate: float = 0.0, interpret: bool = False, layout: str | None = None,
                    block_q: int | None = None, block_k: int | None = None):
  """The Pallas kernel over the whole batch of the fused projection [B,T,3,N,H] (see `fuse`)
  plus its bias [3,N,H] where given: under a mesh, each device runs it on its own rows and
  heads (shard_map), with the global row and head offsets that keep the dropout bits
  mesh-independent. `layout` ("tpu" or "gpu"; default: the traced platform's) shapes the
  per-query statistics and segment ids for the chip's vector tiles; tests interpret both."""
  b, t, _, n, h = kvq_BT3NH.shape
  tpu = (layout or target_platform()) == "tpu"
  # TPU blocks are tiles of one head's rows: q, k and v as [B,N,T,H] (the bias added as they
  # are transposed). Triton reads a head's rows strided from the fused projection, adds their
  # bias as it reads them, and writes the gradient in place: no pass over the projection
  # around the kernels.
  to_bnth = lambda x: jnp.transpose(x, (0, 2, 1, 3))
  qkv = kvq_BT3NH
  if tpu:
    qkv = tuple(to_bnth(x) for x in queries_keys_values(kvq_BT3NH, bias_3NH))
    bias_3NH = None
  # TPU: statistics as [rows, 128] lane tiles and key ids as [8, keys] sublane tiles (as splash
  # keeps them), blocks of one lane tile; elsewhere plain columns and rows, 64 queries and 32
  # keys, or a quarter of them where that is fewer (at least 16): one dropout hash then serves
  # four blocks (kernel_dropout.groups). Compiled for an H200, ptxas spills at most 64 bytes per
  # thread there (the dK/dV kernel's four pairs of accumulators, at length 512), against 2.3 KB
  # with 128 x 64 blocks and a hash per element.
  block_q = block_q or (128 if tpu else 64)
  block_k = block_k or (128 if tpu else max(16, min(32, t // 4)))
  cfg = flash.Config(rate=rate, interpret=interpret, block_q=min(block_q, t),
                     block_k=min(block_k, t),
                     lanes=128 if tpu else 1, sublanes=8 if tpu else 1,
                     smem=tpu and not interpret,
                     triton=not interpret and target_platform() == "gpu", fused=not tpu)
  mesh, batch, heads = _batch_head_specs(b, n)
  q_seg_BT, kv_seg_BS = q_seg_BT.astype(jnp.int32), kv_seg_BS.astype(jnp.int32)
  if not batch and not heads:
    out = flash.flash(qkv, bias_3NH, q_seg_BT, kv_seg_BS, _offset_words(words, 0, 0), cfg)
    return to_bnth(out) if tpu else out
  from jax.sharding import PartitionSpec as P
  b_axes, n_axes = batch or None, heads or None
  local_b = b // math.prod(mesh.shape[a] for a in batch)
  local_n = n // math.prod(mesh.shape[a] for a in heads)

  def local(qkv, bias, qs, kvs, words):
    offsets = (_axis_offset(batch, local_b), _axis_offset(heads, local_n))
    return flash.flash(qkv, bias, qs, kvs, _offset_words(words, *offsets), cfg)

  bnth = P(b_axes, n_axes, None, None)
  qkv_spec = (bnth,) * 3 if tpu else P(b_axes, None, None, n_axes, None)
  seg = P(b_axes, None)
  bias_spec = P(None, n_axes, None)
  out = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, bias_spec, seg, seg, P()),
                      out_specs=bnth if tpu else P(b_axes, None, n_axes, None),
                      check_vma=False)(qkv, bias_3NH, q_seg_BT, kv_seg_BS, words)
  return to_bnth(out) if tpu else out


def _offset_words(words, b_offset, n_offset):
  """[key0, key1, first row, first head] as uint32."""
  offsets = jnp.stack([jnp.asarray(b_offset, jnp.uint32), jnp.asarray(n_offset, jnp.uint32)])
  return jnp.concatenate([words.astype(jnp.uint32), offsets])


# ----------------------------------------------------------------------------- TPU splash

def _splash(q_BTNH, k_BSNH, v_BSNH, segments: Segments):
  """TPU splash attention (full mask, segment ids), one kernel per row under vmap, inside
  shard_map over the batch and heads as the Pallas path."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  from jax.sharding import PartitionSpec as P
  b, t, n, h = q_BTNH.shape
  s = k_BSNH.shape[1]
  to_bnth = lambda x: jnp.transpose(x, (0, 2, 1, 3))
  q = to_bnth(q_BTNH) * jnp.asarray(1.0 / math.sqrt(h), q_BTNH.dtype)
  k, v = to_bnth(k_BSNH), to_bnth(v_BSNH)
  q_seg, kv_seg = segments.queries(t).astype(jnp.int32), segments.kv_BS.astype(jnp.int32)
  mesh, batch, heads = _batch_head_specs(b, n)
  local_n = n // (mesh.shape["tensor"] if heads else 1)

  def local(q, k, v, qs, kvs):
    mask = splash.MultiHeadMask([splash.FullMask((t, s)) for _ in range(local_n)])
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1)
    return jax.vmap(lambda q, k, v, qs, kvs: kernel(q, k, v, splash.SegmentIds(qs, kvs)))(
        q, k, v, qs, kvs)

  if batch or heads:
    qkv, seg = P(batch or None, heads or None, None, None), P(batch or None, None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg),
                          out_specs=qkv, check_vma=False)
  return to_bnth(local(q, k, v, q_seg, kv_seg).astype(v_BSNH.dtype))
