"""Optimisers (BERT AdamW with/without bias correction, LAMB), decay mask, LR schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _mesh_worker import make_cfg, tiny_model_config
from bert_jax.errors import UserError
from bert_jax.modeling.heads import BertForPreTraining
from bert_jax.training.optim import decay_mask, make_optimizer, make_schedule
from bert_jax.training.phases import make_phases

NAMES = {"dense": {"kernel": (3, 4), "bias": (4,)}, "LayerNorm": {"scale": (4,), "bias": (4,)},
         "embed": {"embedding": (5, 3)}}


def _tree(rs, scale=1.0):
  return {m: {p: (rs.randn(*shape) * scale).astype(np.float32) for p, shape in d.items()}
          for m, d in NAMES.items()}


def _numpy_adamw(params, grads_seq, lrs, b1, b2, eps, wd, clip, bias_correction):
  p = {k: dict(v) for k, v in params.items()}
  m = {k: {n: np.zeros_like(x) for n, x in v.items()} for k, v in p.items()}
  v_ = {k: {n: np.zeros_like(x) for n, x in v.items()} for k, v in p.items()}
  for t, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for d in grads.values()
                       for g in d.values()))
    factor = min(1.0, clip / norm)
    for mod, d in grads.items():
      for name, g in d.items():
        g = g * factor
        m[mod][name] = b1 * m[mod][name] + (1 - b1) * g
        v_[mod][name] = b2 * v_[mod][name] + (1 - b2) * g * g
        mh, vh = m[mod][name], v_[mod][name]
        if bias_correction:
          mh, vh = mh / (1 - b1 ** t), vh / (1 - b2 ** t)
        update = mh / (np.sqrt(vh) + eps)
        if name != "bias" and mod != "LayerNorm":
          update = update + wd * p[mod][name]
        p[mod][name] = p[mod][name] - lr * update
  return p


@pytest.mark.parametrize("bias_correction", [False, True])
def test_adamw_matches_numpy_reference(bias_correction):
  cfg = make_cfg(total_steps=10, warmup_steps=2, learning_rate=0.1, weight_decay=0.1,
                 bias_correction=bias_correction)
  phases = make_phases(cfg)
  optimizer, schedule = make_optimizer(cfg, phases)
  rs = np.random.RandomState(0)
  params = _tree(rs)
  grads_seq = [_tree(rs, scale=0.5 if i else 0.01) for i in range(4)]  # clipped after step 0
  state = optimizer.init(params)
  p = jax.tree.map(jnp.asarray, params)
  for step, grads in enumerate(grads_seq):
    updates, state = optimizer.update(grads, state, p, global_step=step)
    p = optax.apply_updates(p, updates)
  lrs = [float(schedule(s)) for s in range(4)]
  assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.1 * (1 - 2 / 10))  # decayed from step 0
  expected = _numpy_adamw(params, grads_seq, lrs, 0.9, 0.999, 1e-6, 0.1, 1.0, bias_correction)
  for mod in NAMES:
    for name in NAMES[mod]:
      np.testing.assert_allclose(p[mod][name], expected[mod][name], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{mod}/{name}")
  # The two forms really differ (the no-correction one moves less early on).
  if not bias_correction:
    other = _numpy_adamw(params, grads_seq, lrs, 0.9, 0.999, 1e-6, 0.1, 1.0, True)
    assert not np.allclose(other["dense"]["kernel"], expected["dense"]["kernel"], atol=1e-4)


def test_decay_mask_on_the_real_param_tree():
  model = BertForPreTraining(tiny_model_config())
  ids = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  import flax.linen as nn
  params = nn.unbox(boxed)
  flat = {"/".join(str(k.key) for k in path): v for path, v in
          jax.tree_util.tree_leaves_with_path(decay_mask(params))}
  for name, decays in flat.items():
    no_decay = name.endswith("/bias") or "LayerNorm" in name
    assert decays == (not no_decay), name
  assert flat["cls/predictions/bias"] is False
  assert flat["bert/embeddings/LayerNorm/scale"] is False
  assert flat["bert/embeddings/word_embeddings/embedding"] is True
  assert flat["bert/encoder/layer_0/attention/self/query/kernel"] is True
  assert flat["bert/encoder/layer_1/output/LayerNorm/scale"] is False
  # Same mask through nn.Partitioned boxes (as seen when the sharded state is initialised).
  assert jax.tree.leaves(decay_mask(boxed)) == jax.tree.leaves(decay_mask(params))


def _schedule_cfg(kind, decay_from="warmup_end", **optim):
  cfg = make_cfg(total_steps=100, warmup_steps=10, learning_rate=1e-3, schedule=kind,
                 end_learning_rate=1e-5, decay_from=decay_from, **optim)
  cfg.phases[1].update(warmup_steps=2, learning_rate=5e-4)
  return cfg


def _google_bert_lr(step, lr, warmup, total, end=0.0, power=1.0):
  """google-research/bert optimization.py, written out: tf.train.polynomial_decay(lr, step,
  total, end, power) from step 0, then the linear warmup lr * step / warmup overrides it for
  step < warmup."""
  decayed = (lr - end) * (1 - min(step, total) / total) ** power + end
  return lr * step / warmup if warmup and step < warmup else decayed


@pytest.mark.parametrize("power,end", [(1.0, 0.0), (1.0, 1e-5), (0.5, 0.0)])
def test_paper_schedule_is_google_research_bert_formula(power, end):
  """The default (decay_from="zero"): no T/(T-w) boost after warmup."""
  cfg = _schedule_cfg("continuous", decay_from="zero", decay_power=power)
  cfg.optim.end_learning_rate = end
  sched = make_schedule(cfg, make_phases(cfg))
  for step in (0, 1, 5, 9, 10, 11, 50, 89, 90, 99, 100, 150):
    assert float(sched(step)) == pytest.approx(_google_bert_lr(step, 1e-3, 10, 100, end, power),
                                               rel=1e-5, abs=1e-12), step
  if (power, end) == (1.0, 0.0):
    assert float(sched(10)) == pytest.approx(1e-3 * 0.9)  # after warmup: lr (1 - w/T), not lr
  # Without decay_from in the config (an older or hand-written config) the paper form is used.
  del cfg.optim["decay_from"]
  assert float(make_schedule(cfg, make_phases(cfg))(50)) == pytest.approx(
      _google_bert_lr(50, 1e-3, 10, 100, end, power), rel=1e-5)


def test_paper_configs_default_to_the_google_research_bert_schedule():
  from bert_jax.pretraining.run_config import load_config_file
  for name in ("bert_base_paper", "bert_large_paper", "chinese_base", "bert_large_lamb",
               "tiny_cpu"):
    assert load_config_file(f"configs/{name}.py").optim.decay_from == "zero", name
  cfg = load_config_file("configs/bert_base_paper.py")
  sched = make_schedule(cfg, make_phases(cfg))
  for step in (0, 5_000, 10_000, 500_000, 900_000, 999_999):
    assert float(sched(step)) == pytest.approx(_google_bert_lr(step, 1e-4, 10_000, 1_000_000),
                                               rel=1e-5, abs=1e-11), step  # float32 steps


def test_per_phase_schedule_decays_each_phase_from_its_start():
  """NVIDIA's PolyWarmUpScheduler: lr * (1 - progress)^power after warmup, progress from the
  phase's first step (the same shape as google-research/bert's, per phase)."""
  cfg = _schedule_cfg("per_phase", decay_from="zero", decay_power=0.5)
  cfg.optim.end_learning_rate = 0.0
  sched = make_schedule(cfg, make_phases(cfg))
  for step in (0, 5, 10, 40, 89):
    assert float(sched(step)) == pytest.approx(_google_bert_lr(step, 1e-3, 10, 90, power=0.5),
                                               rel=1e-5), step
  for step in (90, 91, 92, 95, 99):
    assert float(sched(step)) == pytest.approx(
        _google_bert_lr(step - 90, 5e-4, 2, 10, power=0.5), rel=1e-5, abs=1e-12), step


def test_decay_from_is_validated():
  cfg = _schedule_cfg("continuous", decay_from="middle")
  with pytest.raises(UserError, match="optim.decay_from"):
    make_schedule(cfg, make_phases(cfg))


def test_continuous_schedule_values():
  """decay_from="warmup_end": the decay starts at the peak at warmup's end."""
  cfg = _schedule_cfg("continuous")
  sched = make_schedule(cfg, make_phases(cfg))
  lr = lambda s: float(sched(s))
  assert lr(0) == 0.0
  assert lr(5) == pytest.approx(5e-4)
  assert lr(10) == pytest.approx(1e-3)                                    # warmup end: peak
  assert lr(90) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (10 / 90), rel=1e-5)  # phase boundary
  assert lr(100) == pytest.approx(1e-5)                                   # end
  assert lr(150) == pytest.approx(1e-5)


def test_per_phase_schedule_rewarms():
  cfg = _schedule_cfg("per_phase")
  sched = make_schedule(cfg, make_phases(cfg))
  lr = lambda s: float(sched(s))
  assert lr(10) == pytest.approx(1e-3)
  assert lr(89) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 / 80), rel=1e-5)
  assert lr(90) == 0.0                                                    # re-warmed
  assert lr(91) == pytest.approx(2.5e-4)
  assert lr(92) == pytest.approx(5e-4)                                    # phase 2 peak
  assert lr(100) == pytest.approx(1e-5)
  # jit-able over a traced step
  np.testing.assert_allclose(jax.jit(sched)(jnp.int32(92)), 5e-4, rtol=1e-6)


def test_bad_optimizer_settings_name_the_field():
  cfg = make_cfg(name="sgd")
  with pytest.raises(UserError, match="optim.name"):
    make_optimizer(cfg, make_phases(cfg))
  cfg = make_cfg(schedule="cosine")
  with pytest.raises(UserError, match="optim.schedule"):
    make_optimizer(cfg, make_phases(cfg))


def test_global_step_drives_the_learning_rate():
  cfg = make_cfg(total_steps=100, warmup_steps=10, learning_rate=1.0, clip_norm=0.0,
                 weight_decay=0.0)
  optimizer, _ = make_optimizer(cfg, make_phases(cfg))
  params = {"w": jnp.ones(3)}
  state = optimizer.init(params)
  grads = {"w": jnp.ones(3)}
  u_own, _ = optimizer.update(grads, state, params)               # own count 0 -> lr 0
  u_global, _ = optimizer.update(grads, state, params, global_step=5)  # lr 0.5
  np.testing.assert_allclose(u_own["w"], 0.0)
  # m = 0.1, v = 0.001 after one step (no bias correction): -lr * m / (sqrt(v) + eps)
  np.testing.assert_allclose(u_global["w"], -0.5 * 0.1 / (np.sqrt(1e-3) + 1e-6), rtol=1e-5)


def test_lamb_trust_ratio_and_exclusions():
  cfg = make_cfg(name="lamb", total_steps=100, warmup_steps=0, learning_rate=0.01,
                 weight_decay=0.01, bias_correction=True, clip_norm=0.0)
  optimizer, schedule = make_optimizer(cfg, make_phases(cfg))
  rs = np.random.RandomState(1)
  params, grads = _tree(rs), _tree(rs)
  updates, _ = optimizer.update(grads, optimizer.init(params), params, global_step=0)
  lr = float(schedule(0))
  for mod, name in (("dense", "kernel"), ("embed", "embedding")):
    # Layer-adapted: the step's norm is lr * ||w||, whatever the gradient scale.
    np.testing.assert_allclose(np.linalg.norm(updates[mod][name]),
                               lr * np.linalg.norm(params[mod][name]), rtol=1e-5)
  for mod, name in (("dense", "bias"), ("LayerNorm", "scale")):
    # Excluded: plain bias-corrected Adam's first step, sign(g) * lr (no decay, no ratio).
    g = grads[mod][name]
    np.testing.assert_allclose(updates[mod][name], -lr * g / (np.abs(g) + 1e-6), rtol=1e-4)


def test_finetune_optimizer_is_optax_adamw_with_linear_warmup_and_decay():
  """The fine-tuning recipe, built from the pretraining parts, equals optax.adamw under
  transformers' linear schedule (warmup from 0, then decay to 0 from the warmup's end)."""
  from bert_jax.training.optim import finetune_optimizer
  total, warmup, lr = 10, 3, 1e-2
  ours, schedule = finetune_optimizer(lr, total, warmup, weight_decay=0.1, max_grad_norm=1.0)
  sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                optax.linear_schedule(lr, 0.0, total - warmup)], [warmup])
  mask = lambda p: {"dense": {"kernel": True, "bias": False}}
  reference = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(sched, eps=1e-8, weight_decay=0.1, mask=mask))
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}}
  p_ours, p_ref = params, params
  s_ours, s_ref = ours.init(params), reference.init(params)
  for step in range(total):
    np.testing.assert_allclose(schedule(step), sched(step), rtol=1e-6, atol=1e-9)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    u, s_ours = ours.update(grads, s_ours, p_ours, global_step=step)
    p_ours = optax.apply_updates(p_ours, u)
    u, s_ref = reference.update(grads, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
  for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_finetune_cosine_schedule_is_transformers_cosine_with_warmup():
  """--lr-schedule cosine: transformers' get_cosine_schedule_with_warmup (half a cosine to 0)."""
  import math
  from bert_jax.training.optim import finetune_optimizer
  lr, total, warmup = 3e-5, 50, 10
  _, schedule = finetune_optimizer(lr, total, warmup, 0.01, 1.0, decay="cosine")

  def reference(step):  # transformers' lr_lambda, times the peak
    if step < warmup:
      return lr * step / warmup
    progress = (step - warmup) / (total - warmup)
    return lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

  for step in (0, 5, 10, 11, 30, 49, 50):
    assert float(schedule(step)) == pytest.approx(reference(step), rel=1e-5, abs=1e-12)
