"""Optimisers and learning-rate schedules: BERT's pretraining recipes and fine-tuning AdamW.

- AdamW as BERT's original AdamWeightDecay (no bias correction: update = m / (sqrt(v) + eps)
  with m, v the raw moving averages) or the bias-corrected form, by `cfg.optim.bias_correction`.
- LAMB (NVIDIA's large-batch recipe): bias-corrected Adam direction, weight decay, then a
  per-tensor trust ratio ||w|| / ||update||; both decay and trust ratio skip LayerNorm and biases
  (as the original LAMB's exclude_from_layer_adaptation and apex's default).
- Global-norm clipping (1.0) of the raw gradients before the optimiser, as BERT does.
- Learning rate over the GLOBAL step, continuous across phases (the paper) or re-warmed per
  phase (NVIDIA). `optim.decay_from="zero"` is google-research/bert's optimization.py:
  polynomial_decay(lr, step, total, end_lr, power) from step 0 over all steps, and for the
  first `warmup` steps the linear warmup lr * step / warmup overrides it (NVIDIA's
  PolyWarmUpScheduler is the same shape: lr * (1 - step/total)^power after warmup). So the
  rate after warmup is lr * (1 - warmup/total)^power, not lr. `"warmup_end"` starts the decay
  at the peak at the end of warmup instead (T/(T-w) higher from there on). The step is passed
  as the `global_step` extra argument of `update`, so a skipped (non-finite) step still
  advances the schedule; without it the optimiser falls back to its own update count.
- Fine-tuning (`finetune_optimizer`): AdamW as transformers fine-tunes, from the same parts:
  bias-corrected moments, eps 1e-8, decoupled weight decay under the same `decay_mask`, a
  linear warmup and then a linear decay to 0 from the warmup's end.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from bert_jax.errors import UserError
from bert_jax.training.phases import Phase

NO_DECAY_SUBSTRINGS = ("LayerNorm", "layer_norm")
OPTIMIZERS = ("adamw", "lamb")
SCHEDULES = ("continuous", "per_phase")
DECAY_FROM = ("zero", "warmup_end")  # the first is the default (google-research/bert's)


def _dict_keys(path) -> list[str]:
  # Boxed (nn.Partitioned) trees add a `.value` attribute key: only dict keys name params.
  return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: every one but LayerNorm scales/biases and
  biases (including the MLM output bias)."""
  def decays(path, _):
    keys = _dict_keys(path)
    if keys and keys[-1] == "bias":
      return False
    return not any(s in k for k in keys for s in NO_DECAY_SUBSTRINGS)
  return jax.tree_util.tree_map_with_path(decays, params)


# ----------------------------------------------------------------------------- schedules

def _warmup_poly(step, peak: float, warmup: int, total: int, end: float, power: float,
                 decay_from: str = "zero"):
  """Linear warmup 0 -> peak over `warmup` steps; polynomial decay peak -> end reached at
  `total` (and held after), counted from step 0 ("zero") or from the warmup's end."""
  step = jnp.asarray(step, jnp.float32)
  warm = peak * step / max(warmup, 1)
  start = 0 if decay_from == "zero" else warmup
  progress = jnp.clip((step - start) / max(total - start, 1), 0.0, 1.0)
  decay = end + (peak - end) * (1.0 - progress) ** power
  return jnp.where(step < warmup, warm, decay)


def check_optim_config(o: Any) -> None:
  """UserError naming the first cfg.optim field this module cannot build (checked when the
  config is validated, before any work, and again when the optimizer is made)."""
  if o.name not in OPTIMIZERS:
    raise UserError(f"--config.optim.name={o.name!r}: expected 'adamw' or 'lamb'")
  if o.schedule not in SCHEDULES:
    raise UserError(f"--config.optim.schedule={o.schedule!r}: expected 'continuous' or "
                    "'per_phase'")
  if o.get("decay_from", DECAY_FROM[0]) not in DECAY_FROM:
    raise UserError(f"--config.optim.decay_from={o.decay_from!r}: expected 'zero' (decay over "
                    "all steps from step 0, as google-research/bert) or 'warmup_end'")


def make_schedule(cfg: Any, phases: Sequence[Phase]) -> optax.Schedule:
  """Learning rate as a function of the global step (0-based: the value used by update s)."""
  o = cfg.optim
  check_optim_config(o)
  end, power = float(o.end_learning_rate), float(o.decay_power)
  decay_from = str(o.get("decay_from", DECAY_FROM[0]))
  kind = str(o.schedule)
  if kind == "continuous":
    peak, warmup = float(o.learning_rate), int(o.warmup_steps)
    total = phases[-1].end_step
    return lambda step: _warmup_poly(step, peak, warmup, total, end, power, decay_from)

  def schedule(step):  # per_phase
    step = jnp.asarray(step)
    lr = jnp.asarray(0.0, jnp.float32)
    for p in phases:  # few phases: a select per phase
      here = _warmup_poly(step - p.start_step, p.learning_rate, p.warmup_steps, p.num_steps,
                          end, power, decay_from)
      in_phase = (step >= p.start_step) & ((step < p.end_step) | (p is phases[-1]))
      lr = jnp.where(in_phase, here, lr)
    return lr
  return schedule


# ----------------------------------------------------------------------------- transforms

class ScaleByAdamState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


def scale_by_bert_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                       bias_correction: bool = False) -> optax.GradientTransformation:
  """Adam's direction m / (sqrt(v) + eps): raw moments (BERT's AdamWeightDecay) or
  bias-corrected ones. Moments are kept in float32 whatever the gradient dtype."""
  def init(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
    return ScaleByAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                            jax.tree.map(zeros, params))

  def update(grads, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                      state.nu, grads)
    count = optax.safe_increment(state.count)
    if bias_correction:
      c1 = 1 - b1 ** count.astype(jnp.float32)
      c2 = 1 - b2 ** count.astype(jnp.float32)
      direction = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
    else:
      direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return direction, ScaleByAdamState(count, mu, nu)

  return optax.GradientTransformation(init, update)


class ScheduleState(NamedTuple):
  count: jax.Array


def scale_by_global_step_schedule(schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
  """Multiplies updates by -schedule(global_step); `global_step` comes from update's extra
  arguments (the train state's step), else from this transform's own count."""
  def init(params):
    del params
    return ScheduleState(jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, global_step=None, **extra_args):
    del params, extra_args
    step = state.count if global_step is None else global_step
    lr = schedule(step)
    updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    return updates, ScheduleState(optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(cfg: Any, phases: Sequence[Phase]
                   ) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
  """(optimizer, schedule) from cfg.optim. Call `optimizer.update(grads, opt_state, params,
  global_step=step)` to follow the global step."""
  o = cfg.optim
  schedule = make_schedule(cfg, phases)
  name = str(o.name)
  parts = []
  if float(o.clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(o.clip_norm)))
  # LAMB is AdamW's update scaled per layer by its trust ratio. It is defined with bias-corrected
  # moments (NVIDIA's recipe): configs set optim.bias_correction=True for it; False keeps BERT's
  # raw moments.
  parts.append(scale_by_bert_adam(float(o.b1), float(o.b2), float(o.eps),
                                  bool(o.bias_correction)))
  parts.append(optax.add_decayed_weights(float(o.weight_decay), mask=decay_mask))
  if name == "lamb":
    parts.append(optax.masked(optax.scale_by_trust_ratio(), decay_mask))
  parts.append(scale_by_global_step_schedule(schedule))
  return optax.chain(*parts), schedule


def finetune_optimizer(learning_rate: float, total_updates: int, warmup_updates: int,
                       weight_decay: float, max_grad_norm: float, decay: str = "linear"
                       ) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
  """(optimizer, schedule) for fine-tuning: what optax.adamw with transformers'
  get_linear_schedule_with_warmup (or get_cosine_schedule_with_warmup: `decay="cosine"`)
  computes, as the parts the pretraining recipes use."""
  if decay not in ("linear", "cosine"):
    raise UserError(f"--lr-schedule {decay}: expected linear or cosine")

  def schedule(step):
    if decay == "linear":
      return _warmup_poly(step, learning_rate, warmup_updates, total_updates, 0.0, 1.0,
                          "warmup_end")
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup_updates) / max(total_updates - warmup_updates, 1), 0, 1)
    cosine = learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup_updates, learning_rate * step / max(warmup_updates, 1),
                     cosine)
  parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
  parts += [scale_by_bert_adam(0.9, 0.999, 1e-8, bias_correction=True),
            optax.add_decayed_weights(weight_decay, mask=decay_mask),
            scale_by_global_step_schedule(schedule)]
  return optax.chain(*parts), schedule
