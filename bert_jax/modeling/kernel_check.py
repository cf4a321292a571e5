"""The Pallas attention kernel run once on the device before a run trains through it.

On TPUs and GPUs the kernel is compiled (Mosaic, Triton), which the CPU tests cannot run: they
check its logic in interpret mode. So before training, each length (and dropout rate) a run's
steps will take through the compiled kernel is run once on the device, at two rows and two
heads, against the unfused XLA path with the same dropout bits, forward and gradients. A
compiler or driver that builds the kernel wrongly then stops the run at once, naming
`attention=xla`, instead of training on wrong attention for days. It costs a small compile per
case (a pretraining run has one per phase; compiled for an H100 on a CPU host, the kernel's
forward and gradients take 0.3 to 3 s in bfloat16)."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.errors import UserError
from bert_jax.modeling import attention

# Largest difference allowed, relative to the largest value of the same output or gradient.
# The reference is float32; a bfloat16 kernel's output and gradients are within 0.6% of it at
# lengths 32 to 512 (interpreted); with wrong dropout bits they are 60% off.
TOLERANCE = 0.02
ROWS, HEADS = 2, 2


def kernel_cases(model_config, platform: str, lengths, packed: bool = False
                 ) -> list[tuple[int, float]]:
  """(length, dropout rate) of each compiled Pallas kernel a run's steps take: training's at
  the model's rate, evaluation's (packed rows, float32 on GPUs) without dropout."""
  if platform not in ("gpu", "tpu"):  # the CPU interprets it: the tests' form
    return []
  mc = model_config
  rate = mc.attention_probs_dropout_prob
  return sorted({(t, rate if training else 0.0) for t in lengths for training in (True, False)
                 if attention.choose(mc.attention, platform, rate, training,
                                     (t, t, mc.head_dim), mc.dtype, packed) == "pallas"})


def max_error(t: int, head_dim: int, dtype: str, rate: float, seed: int = 0) -> float:
  """The kernel's largest relative difference from the XLA path in float32 (on the same
  rounded inputs), over the output and the gradients of the fused projection and its bias, at
  [2, t] with two heads: row 0 holds two packed sequences, row 1 one sequence and padding."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  kvq = jax.random.normal(keys[0], (ROWS, t, 3, HEADS, head_dim)).astype(dtype)
  bias = (0.5 * jax.random.normal(keys[1], (3, HEADS, head_dim))).astype(dtype)
  cotangent = jax.random.normal(keys[2], (ROWS, t, HEADS, head_dim))
  ids = np.ones((ROWS, t), np.int32)
  ids[0, t // 2:] = 2
  ids[1, t - t // 4:] = 0
  segments = attention.Segments(jnp.asarray(ids), jnp.asarray(ids))

  def weighted(path, kvq, bias):
    out = attention.attend(kvq, segments, bias_3NH=bias, rate=rate, key=keys[3],
                           implementation=path).astype(jnp.float32)
    return jnp.sum(out * cotangent), out

  @jax.jit
  def reference_and_kernel(kvq, bias):
    grads = lambda path: jax.value_and_grad(functools.partial(weighted, path), argnums=(0, 1),
                                            has_aux=True)
    with jax.default_matmul_precision("highest"):
      reference = grads("xla")(kvq.astype(jnp.float32), bias.astype(jnp.float32))
    return reference, grads("pallas")(kvq, bias)

  # the output and the two gradients (not the loss: a sum that cancels)
  compared = [[out, *grads] for (_, out), grads in reference_and_kernel(kvq, bias)]
  worst = 0.0
  for r, k in zip(*compared):
    r, k = np.asarray(r).astype(np.float64), np.asarray(k).astype(np.float64)
    error = float(np.max(np.abs(k - r))) / max(float(np.max(np.abs(r))), 1e-30)
    worst = max(worst, error if np.isfinite(error) else np.inf)
  return worst


def verify(model_config, lengths, packed: bool = False, device=None) -> str | None:
  """Runs the kernel for each of a run's `kernel_cases` on `device`'s platform (default: this
  process's first device): a line for the run's log, None where no step takes the kernel. A
  kernel that differs from the XLA path by more than TOLERANCE raises a UserError naming the
  way around it."""
  device = device or jax.local_devices()[0]
  cases = kernel_cases(model_config, device.platform, lengths, packed)
  if not cases:
    return None
  start = time.perf_counter()
  worst = 0.0
  for t, rate in cases:
    error = max_error(t, model_config.head_dim, model_config.dtype, rate)
    if not error <= TOLERANCE:
      raise UserError(
          f"attention: the Pallas kernel compiled for this {device.platform} "
          f"({device.device_kind}, jax {jax.__version__}) differs from the XLA path by "
          f"{error:.3g} of the largest value at length {t}, dropout {rate} (expected at most "
          f"{TOLERANCE}): train with attention=xla (pretrain: --config.model.attention=xla; "
          "finetune: --attention xla) and report it")
    worst = max(worst, error)
  checked = ", ".join(f"{t} (dropout {rate})" for t, rate in cases)
  return (f"attention kernel checked on this {device.platform} at length {checked}: within "
          f"{worst:.1e} of the XLA path, forward and gradients "
          f"({time.perf_counter() - start:.1f} s)")
