"""The fused attention kernel (bert_jax.modeling.attention) against the unfused XLA path: values and
gradients with padding and packed segments, attention dropout inside the kernel drawing the
very bits of dropout.keep_mask, the path each platform takes, and the TPU program `plan`
compiles. On a CPU the Pallas kernel runs in interpret mode; on a GPU (tools/device_check.sh)
the same tests run the compiled kernel."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _mesh_worker import state_copies
from bert_jax.config import BertConfig
from bert_jax.errors import UserError
from bert_jax.modeling import attention, dropout, ops
from bert_jax.modeling.heads import BertForPreTraining

INTERPRET = jax.default_backend() == "cpu"
B, T, N, H = 2, 32, 2, 16
KEY = jax.random.PRNGKey(3)


def _qkv(seed=0, dtype=jnp.float32, t=T):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(B, t, N, H)), dtype) for _ in range(3))


def _segments(kind, t=T):
  if kind == "padded":
    mask = np.ones((B, t), np.int32)
    mask[1, 20:] = 0
    return attention.Segments(None, jnp.asarray(mask))
  # Two sequences and padding in row 0 (its padding queries see no key), one in row 1.
  ids = np.array([[1] * 10 + [2] * 14 + [0] * (t - 24), [1] * t], np.int32)
  return attention.Segments(jnp.asarray(ids), jnp.asarray(ids))


def _textbook(q, k, v, segments, rate):
  """Autodiff of softmax, dropout with keep_mask's bits, and the product with v."""
  probs = ops._softmax_probs(q, k, segments.mask())
  if rate:
    t = q.shape[1]
    keep, scale = dropout.keep_mask(KEY, (B, N, t, t), rate)
    probs = jnp.where(keep, probs * scale, 0.0)
  return jnp.einsum("bnts,bsnh->btnh", probs, v)


def _fused(q, k, v, segments, rate, key=KEY, block_q=16, bias=None):
  """The kernel on q, k and v fused as the model's projection (and its bias [3,N,H], added in
  the kernel): the gradients come back through the stack, split from the one [B,T,3,N,H]
  gradient the kernels write."""
  return attention.flash_attention(attention.fuse(q, k, v, axis=2),
                                   segments.queries(q.shape[1]), segments.kv_BS,
                                   dropout.key_words_of(key), bias_3NH=bias, rate=rate,
                                   interpret=INTERPRET, block_q=block_q, block_k=16)


# 16-key blocks: at length 32 each spans two quarters of the keys (a hash per element); at 64
# each is a quarter, and the four at one offset share their hashes (kernel_dropout.groups). 16-query
# blocks hash again in the backward kernels; 32-query blocks (the GPU's are 64) make the forward
# kernel write its keep bits for them (kernel_dropout.packs_keep).
@pytest.mark.parametrize("kind,t,block_q", [("padded", 32, 16), ("packed", 32, 16),
                                            ("packed", 64, 16), ("packed", 64, 32)])
@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_kernel_equals_the_xla_path_forward_and_gradients(kind, t, block_q, rate):
  """With the projection's bias, which the kernel adds to q, k and v as it reads them."""
  segments = _segments(kind, t)
  q, k, v = _qkv(t=t)
  bias = jnp.asarray(np.random.default_rng(5).normal(size=(3, N, H)), jnp.float32)
  g = jax.random.normal(jax.random.PRNGKey(1), q.shape)
  fused = lambda q, k, v, b: _fused(q, k, v, segments, rate, block_q=block_q, bias=b)
  # the bias [3,N,H] split as the projection is: [1,1,N,H] for each of q, k and v
  textbook = lambda q, k, v, b: _textbook(*(x + y for x, y in zip(
      (q, k, v), attention.queries_keys_values(b[None, None]))), segments, rate)
  with jax.default_matmul_precision("highest"):
    ref, ref_grads = jax.value_and_grad(
        lambda *x: jnp.sum(textbook(*x) * g), argnums=(0, 1, 2, 3))(q, k, v, bias)
    out, grads = jax.value_and_grad(
        lambda *x: jnp.sum(fused(*x) * g), argnums=(0, 1, 2, 3))(q, k, v, bias)
    np.testing.assert_allclose(fused(q, k, v, bias), textbook(q, k, v, bias), atol=2e-6,
                               rtol=1e-5)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)  # a sum of 4,096 products
  for name, a, b in zip(["q", "k", "v", "bias"], grads, ref_grads):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
  if rate == 0.0:  # and the deterministic path the model takes on the CPU
    np.testing.assert_allclose(ops.attention(q, k, v, segments.mask())[:, :20],
                               _fused(q, k, v, segments, rate)[:, :20], atol=2e-6)


def test_the_backward_kernels_read_the_forwards_keep_bits():
  """With 32-query blocks and dropout, the gradient's kernels take one [B,N,T/32,S] int32
  array, the forward's keep bits: the dQ and dK/dV kernels read it instead of hashing again."""
  segments = _segments("packed", 64)
  q, k, v = _qkv(t=64)
  grad = jax.grad(lambda q: jnp.sum(_fused(q, k, v, segments, 0.1, block_q=32)))
  calls = [e for e in jax.make_jaxpr(grad)(q).jaxpr.eqns if e.primitive.name == "pallas_call"]
  bits = lambda call: [x.aval.shape for x in call.invars + call.outvars
                       if x.aval.dtype == jnp.int32 and x.aval.ndim == 4]
  assert [bits(call) for call in calls] == [[(B, N, 64 // 32, 64)]] * 3


@pytest.mark.parametrize("kind,t", [("padded", 128), ("packed", 256), ("packed", 512)])
def test_the_tpu_layout_equals_the_xla_path_too(kind, t):
  """The kernel as it runs on a TPU (statistics in 128-lane tiles, key ids in 8-row tiles, key
  blocks of 128), interpreted: values and gradients with dropout, one 128-long block, two (the
  dK/dV kernel reading its statistics at a moving offset) and four blocks that are the four
  quarters of the keys (one hash for four elements). Packed, the padding queries see no key."""
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(1, t, 2, 16)), jnp.float32) for _ in range(3))
  ids = np.ones((1, t), np.int32)
  ids[0, t - 28:] = 0
  if kind == "packed":
    ids[0, 40:t - 28] = 2
  segments = attention.Segments(None if kind == "padded" else jnp.asarray(ids), jnp.asarray(ids))
  g = jax.random.normal(jax.random.PRNGKey(2), q.shape)

  def textbook(q, k, v):
    keep, scale = dropout.keep_mask(KEY, (1, 2, t, t), 0.1)
    probs = jnp.where(keep, ops._softmax_probs(q, k, segments.mask()) * scale, 0.0)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)

  def fused(q, k, v):
    return attention.flash_attention(attention.fuse(q, k, v, axis=2), segments.queries(t),
                                     segments.kv_BS, dropout.key_words_of(KEY), rate=0.1,
                                     interpret=True, layout="tpu")

  with jax.default_matmul_precision("highest"):
    ref = jax.value_and_grad(lambda *x: jnp.sum(textbook(*x) * g), argnums=(0, 1, 2))(q, k, v)
    out = jax.value_and_grad(lambda *x: jnp.sum(fused(*x) * g), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(out[0], ref[0], rtol=1e-5)
  for name, a, b in zip("qkv", out[1], ref[1]):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def _dropped(key, rate=0.1, s=T):
  """keep x scale for every (b, n, t, s), read back through the kernel: q = k = 0 gives uniform
  probabilities 1/S and v = the identity reads them out ([B, T, N, S], T = S)."""
  zeros = jnp.zeros((B, s, N, s))
  eye = jnp.broadcast_to(jnp.eye(s)[None, :, None, :], (B, s, N, s))
  segments = attention.Segments(None, jnp.ones((B, s), jnp.int32))
  out = attention.flash_attention(attention.fuse(zeros, zeros, eye, axis=2),
                                  segments.queries(s), segments.kv_BS,
                                  dropout.key_words_of(key), rate=rate, interpret=INTERPRET,
                                  block_q=16, block_k=16)
  return np.asarray(out) * s


@pytest.mark.parametrize("keys", [T, 64])  # 16-key blocks spanning quarters; quarter blocks
def test_kernel_dropout_keeps_one_minus_rate_and_draws_keep_masks_bits(keys):
  dropped = _dropped(KEY, s=keys)
  kept = dropped > 0
  assert abs(kept.mean() - 0.9) < 0.01
  np.testing.assert_allclose(dropped[kept], 65536.0 / dropout.keep_threshold(0.1), rtol=1e-6)
  keep, _ = dropout.keep_mask(KEY, (B, N, keys, keys), 0.1)
  np.testing.assert_array_equal(kept, np.transpose(np.asarray(keep), (0, 2, 1, 3)))


def test_kernel_dropout_is_the_same_for_a_key_and_differs_by_step():
  first = _dropped(jax.random.fold_in(KEY, 7)) > 0
  np.testing.assert_array_equal(first, _dropped(jax.random.fold_in(KEY, 7)) > 0)
  other = _dropped(jax.random.fold_in(KEY, 8)) > 0
  assert 0.1 < (first != other).mean() < 0.3  # independent draws differ in ~18%


def test_each_platform_takes_its_path():
  full = (128, 128, 64)
  assert attention.choose("auto", "gpu", 0.0, True, full) == "cudnn"
  assert attention.choose("auto", "gpu", 0.1, False, full) == "cudnn"  # evaluation
  # where cuDNN does not fit (float32, packed rows), the Pallas kernel without dropout
  assert attention.choose("auto", "gpu", 0.0, True, full, "float32") == "pallas"
  assert attention.choose("auto", "gpu", 0.1, False, full, packed=True) == "pallas"
  assert attention.choose("auto", "gpu", 0.0, True, (96, 96, 64), packed=True) == "xla"
  # by name: the kernel where it fits, else the XLA path (cuDNN cannot keep packed rows apart)
  assert attention.choose("cudnn", "gpu", 0.0, False, full, packed=True) == "xla"
  with pytest.raises(UserError, match="attention splash runs on TPUs only, not on this gpu"):
    attention.choose("splash", "gpu", 0.0, False, full)
  with pytest.raises(UserError, match="attention cudnn runs on NVIDIA GPUs only, not on this cpu"):
    attention.describe("cudnn", "cpu", 0.0)
  assert attention.choose("auto", "gpu", 0.1, True, full) == "pallas"  # cuDNN cannot drop
  assert attention.choose("auto", "gpu", 0.1, True, (96, 96, 64)) == "xla"  # no power of two
  assert attention.choose("auto", "gpu", 0.1, True, (128, 128, 48)) == "xla"
  assert attention.choose("pallas", "gpu", 0.1, True, full) == "pallas"
  assert attention.choose("pallas", "gpu", 0.1, True, (1, 128, 64)) == "xla"  # [CLS] readout
  assert attention.choose("auto", "tpu", 0.0, True, full) == "splash"
  assert attention.choose("auto", "tpu", 0.1, False, full) == "splash"
  assert attention.choose("auto", "tpu", 0.1, True, full) == "pallas"  # splash cannot drop
  assert attention.choose("auto", "tpu", 0.1, True, (128, 128, 48)) == "pallas"
  assert attention.choose("auto", "tpu", 0.1, True, (64, 64, 64)) == "xla"  # no full tile
  assert attention.choose("auto", "cpu", 0.1, True, full) == "xla"
  assert attention.choose("xla", "gpu", 0.1, True, full) == "xla"
  with pytest.raises(UserError, match="splash has no dropout"):
    attention.choose("splash", "tpu", 0.1, True, full)
  assert "inside the kernel" in attention.describe("pallas", "gpu", 0.1)
  assert "inside the kernel" in attention.describe("auto", "tpu", 0.1)
  assert "inside the kernel" in attention.describe("auto", "gpu", 0.1)
  assert "materialised" in attention.describe("xla", "gpu", 0.1)
  assert "cuDNN" in attention.describe("auto", "gpu", 0.0)
  assert attention.describe("auto", "gpu", 0.1, packed=True).endswith(
      "evaluation fused Pallas kernel")


def _tiny(**kw):
  return BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=64, **kw)


def test_a_training_step_is_the_same_through_the_kernel():
  """BERT in train mode (dropout 0.1 everywhere): loss and every gradient through the Pallas
  kernel equal those of the XLA path for the same dropout key."""
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(5, 96, size=(2, 32)), jnp.int32)
  types = jnp.asarray(np.repeat([[0] * 16 + [1] * 16], 2, 0), jnp.int32)
  mask = jnp.asarray(np.array([[1] * 32, [1] * 24 + [0] * 8]), jnp.int32)
  positions = jnp.asarray([[1, 5, 9], [2, 3, 20]], jnp.int32)
  params = BertForPreTraining(_tiny()).init(jax.random.PRNGKey(0), ids, types, mask)["params"]

  def loss(params, implementation):
    mlm, nsp = BertForPreTraining(_tiny(attention=implementation)).apply(
        {"params": params}, ids, types, mask, masked_positions=positions, deterministic=False,
        rngs={"dropout": jax.random.PRNGKey(5)})
    return jnp.sum(jax.nn.log_softmax(mlm)[..., 7]) + jnp.sum(nsp[:, 0])

  with jax.default_matmul_precision("highest"):
    ref, ref_grads = jax.value_and_grad(loss)(params, "xla")
    out, grads = jax.value_and_grad(loss)(params, "pallas")
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), grads,
               ref_grads)


def _train_step_for(devices, dropout_prob: float, attention: str = "auto", seq_len: int = 128):
  """The tiny config's train step (what `bert-jax plan` compiles), lowered for `devices`."""
  from bert_jax.pretraining import plan
  from bert_jax.pretraining.run_config import resolve_config
  import os
  tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "tiny_cpu.py")
  cfg = resolve_config(tiny, [
      ("phases", f"[{{'fraction': 1.0, 'seq_len': {seq_len}, 'max_predictions': 10, "
                 "'batch_size': 8, 'grad_accum': 1}]"), ("total_steps", "100"),
      ("model.dtype", "bfloat16"), ("model.attention", attention),
      ("model.overrides.attention_probs_dropout_prob", str(dropout_prob))])
  _, phases, _, pretraining = plan.setup(cfg, devices)
  return pretraining.lower_train_step(phases[0])


def test_the_tpu_program_plan_compiles_runs_fused_attention():
  """The train step for a v5e topology calls the fused kernels (Mosaic custom calls): splash
  with attention dropout 0 (the fast recipe), this project's kernel, dropping inside it, with
  the paper's 0.1; at length 512, whose four key blocks share their dropout hashes, libtpu
  compiles it."""
  pytest.importorskip("libtpu", reason="the tpu extra (libtpu) compiles TPU programs")
  from bert_jax.pretraining import plan
  devices = plan.load_target("v5e:2x2").devices
  fast = _train_step_for(devices, 0.0).as_text()
  assert "tpu_custom_call" in fast and "splash" in fast
  paper = _train_step_for(devices, 0.1, seq_len=512)
  text = paper.as_text()
  assert "tpu_custom_call" in text and "_fwd_kernel" in text and "_dkv_kernel" in text
  assert paper.compile().memory_analysis().temp_size_in_bytes > 0


def test_the_kernel_compiles_into_a_gpu_train_step():
  """The train step for two H100s, compiled on this host from a description of the GPU (jax's
  CUDA plugin, the plan-gpu extra), with the kernel dropping inside it: its three kernels are
  Triton calls in the program, and XLA compiles them (the dK/dV kernel once took XLA's Triton
  minutes: a dropout hash feeding a transposed operand). They read the fused q/k/v projection
  and write its gradient where it lies: nothing but the kernels makes an array of its shape
  [B,T,3,N,H] or of a slice of it (XLA's slices, bias add and concatenate once surrounded them).
  The update writes the donated state in place (a conditional finiteness guard once copied
  every parameter and moment)."""
  from bert_jax.devices import gpu_targets
  try:
    devices = gpu_targets.devices("h100:2")
  except RuntimeError as e:
    pytest.skip(str(e))
  lowered = _train_step_for(devices, 0.1, attention="pallas")
  text = lowered.as_text()
  assert text.count("__gpu$xla.gpu.triton") >= 3
  compiled = lowered.compile()
  assert compiled.memory_analysis().temp_size_in_bytes > 0
  assert state_copies(compiled) == []
  entry = compiled.as_text().split("\nENTRY", 1)[1]
  makers = re.findall(r"= \w+\[\d+,\d+,[13],\d+,\d+\]\S* ([\w-]+)\(", entry)
  assert "custom-call" in makers and set(makers) <= {"custom-call", "bitcast"}, makers


@pytest.mark.parametrize("t,dtype,rate,packed", [
    (16, "bfloat16", 0.1, False), (64, "bfloat16", 0.1, True), (512, "bfloat16", 0.1, False),
    (128, "float32", 0.0, True)])  # the smallest fine-tuning bucket; evaluation without cuDNN
def test_the_kernel_compiles_for_a_gpu_at_the_shapes_auto_sends_it(t, dtype, rate, packed):
  """Forward and gradients for one H100, compiled on this host (Triton and ptxas): every
  shape `auto` sends to the kernel on a GPU compiles (all of 16 to 512, heads of 32 and 64,
  bfloat16 and float32, with and without dropout and packing did, 0.3 to 10 s each)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from bert_jax.devices import gpu_targets
  try:
    devices = gpu_targets.devices("h100:1")
  except RuntimeError as e:
    pytest.skip(str(e))
  assert attention.choose("auto", "gpu", rate, rate > 0, (t, t, 64), dtype, packed) == "pallas"
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))

  def loss(kvq, bias, ids, key):
    segments = attention.Segments(ids if packed else None, ids)
    return jnp.sum(attention.attend(kvq, segments, bias_3NH=bias, rate=rate,
                                    key=key if rate else None).astype(jnp.float32))

  shapes = [((4, t, 3, 2, 64), dtype), ((3, 2, 64), dtype), ((4, t), "int32"), ((2,), "uint32")]
  args = [jax.ShapeDtypeStruct(shape, jnp.dtype(d), sharding=NamedSharding(mesh, P()))
          for shape, d in shapes]
  with jax.set_mesh(mesh):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args)
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3  # forward, dQ, dK/dV
  lowered.compile()  # Triton's and ptxas's turn: raises where a shape does not compile


_MESH_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from bert_jax.modeling import attention, dropout
from bert_jax.training import sharding
layout, t, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(2, t, 2, 16)), jnp.float32) for _ in range(3))
bias = jnp.asarray(rng.normal(size=(3, 2, 16)), jnp.float32)
seg = jnp.asarray(np.repeat([[1] * (t - 8) + [0] * 8], 2, 0), jnp.int32)
words = dropout.key_words_of(jax.random.PRNGKey(3))
fused = lambda q, k, v, b: attention.flash_attention(attention.fuse(q, k, v, axis=2), seg, seg,
    words, bias_3NH=b, rate=0.1, interpret=True, layout=layout, block_q=block, block_k=block)
grad = jax.jit(jax.grad(lambda *x: jnp.sum(fused(*x) ** 2), argnums=(0, 1, 2, 3)))
alone = grad(q, k, v, bias)
with jax.set_mesh(sharding.make_mesh(data=2, tensor=2, devices=jax.devices()[:4])):
  sharded = grad(q, k, v, bias)
# relative to each gradient's largest element: the bias gradient sums the batch's rows, in
# another order on the mesh
print(max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(alone, sharded)))
"""


@pytest.mark.parametrize("layout,t,block", [("gpu", 32, 32), ("tpu", 128, 128)])
def test_the_kernel_on_a_mesh_draws_the_same_bits(layout, t, block):
  """Rows and heads split over a data x tensor mesh (shard_map, each shard's global offsets;
  the projection's bias split by heads): the gradients equal those on one device, dropout
  bits included."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, layout, str(t), str(block)],
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert float(proc.stdout.split()[-1]) < 1e-5
