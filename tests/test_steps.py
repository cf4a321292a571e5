"""Train/eval steps on one device: loss definition, accumulation, NaN skip, init merge, dropout."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _mesh_worker import (BATCH, VOCAB, make_cfg, state_copies, synthetic_batch,
                          tiny_model_config)
from bert_jax.devices import mfu
from bert_jax.errors import UserError
from bert_jax.modeling.heads import BertForPreTraining
from bert_jax.training import sharding, steps
from bert_jax.training.phases import make_phases


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(devices=jax.devices()[:1])


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


_COMPILED: dict = {}


def _setup(mesh, model_config, grad_accum=1, cfg=None, init_params=None):
  """(fresh state, its Pretraining, jitted step); compiled once per (model config,
  accumulation)."""
  key = (model_config, grad_accum, init_params is None and cfg is None)
  if key in _COMPILED:
    host_state, pretraining, step = _COMPILED[key]
    return jax.device_put(host_state, pretraining.shardings), pretraining, step
  cfg = cfg or make_cfg()
  phases = make_phases(cfg)
  pretraining = steps.Pretraining(model_config, cfg, mesh, phases)
  state = pretraining.init_state(jax.random.PRNGKey(0), init_params=init_params)
  step = pretraining.train_step(dataclasses.replace(phases[0], grad_accum=grad_accum))
  if key[2]:
    _COMPILED[key] = (_copy(state), pretraining, step)
  return state, pretraining, step


def test_loss_matches_full_logits_reference(mesh):
  """The gathered-position loss equals cross-entropy taken from logits at every position."""
  model_config = tiny_model_config()
  state, pretraining, _ = _setup(mesh, model_config)
  batch = synthetic_batch(3)
  metrics = pretraining.loss.metrics(pretraining.eval_step(state.params, batch))
  full_BTV, nsp_B2 = BertForPreTraining(model_config).apply(
      {"params": state.params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
  logp = np.asarray(jax.nn.log_softmax(full_BTV.astype(jnp.float64)
                                       if jax.config.jax_enable_x64 else full_BTV))
  pos, ids, w = batch["masked_lm_positions"], batch["masked_lm_ids"], batch["masked_lm_weights"]
  nll = -logp[np.arange(BATCH)[:, None], pos, ids]
  mlm = (nll * w).sum() / w.sum()
  hits = (logp[np.arange(BATCH)[:, None], pos].argmax(-1) == ids)
  nsp_logp = np.asarray(jax.nn.log_softmax(nsp_B2))
  nsp = -nsp_logp[np.arange(BATCH), batch["next_sentence_label"]].mean()
  np.testing.assert_allclose(metrics["mlm_loss"], mlm, rtol=1e-5)
  np.testing.assert_allclose(metrics["nsp_loss"], nsp, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], mlm + nsp, rtol=1e-5)
  np.testing.assert_allclose(metrics["mlm_accuracy"], (hits * w).sum() / w.sum(), rtol=1e-6)
  assert metrics["mlm_weight"] == w.sum() and metrics["num_sequences"] == BATCH
  assert float(metrics["mlm_loss"]) == pytest.approx(np.log(VOCAB), rel=0.05)  # fresh init


def test_grad_accumulation_equals_one_big_batch(mesh):
  model_config = tiny_model_config(dropout=0.0)
  results = []
  for accum in (1, 4):
    state, _, step = _setup(mesh, model_config, grad_accum=accum)
    losses = []
    for s in range(3):
      state, metrics = step(state, synthetic_batch(10 + s), jax.random.PRNGKey(1))
      losses.append(float(metrics["loss"]))
      grad_norm = float(metrics["grad_norm"])
    results.append((losses, grad_norm, _copy(state.params)))
  (l1, g1, p1), (l4, g4, p4) = results
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  np.testing.assert_allclose(g4, g1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p4, p1)
  assert l1[0] != l1[-1]


@pytest.mark.parametrize("guard", ["conditional", "select"])
def test_non_finite_batch_is_skipped(mesh, guard, monkeypatch):
  """Under both guards: the conditional that CPUs and TPUs compile, and the select per leaf
  that GPUs do (run here by taking the step's "cuda" branch)."""
  if guard == "select":
    monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, default=None, **branches:
                        branches.get("cuda", default)(*args))
  state, pretraining, step = _setup(mesh, tiny_model_config(),
                                    cfg=make_cfg() if guard == "select" else None)
  lowered = step.lower(pretraining.abstract_state, synthetic_batch(0), jax.random.PRNGKey(1))
  assert ("stablehlo.case" in lowered.as_text()) == (guard == "conditional")
  state, metrics = step(state, synthetic_batch(0), jax.random.PRNGKey(1))
  assert metrics["finite"] == 1.0
  before_params, before_opt = _copy(state.params), _copy(state.opt_state)
  bad = synthetic_batch(1)
  bad["masked_lm_weights"] = bad["masked_lm_weights"] * np.nan
  state, metrics = step(state, bad, jax.random.PRNGKey(1))
  assert metrics["finite"] == 0.0
  assert not np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 2  # the step counter still advances
  jax.tree.map(np.testing.assert_array_equal, _copy(state.params), before_params)
  jax.tree.map(np.testing.assert_array_equal, _copy(state.opt_state), before_opt)
  state, metrics = step(state, synthetic_batch(2), jax.random.PRNGKey(1))
  assert metrics["finite"] == 1.0 and np.isfinite(float(metrics["loss"]))


def test_the_update_writes_the_state_in_place(mesh):
  """The compiled step copies no parameter or moment: the finiteness guard (a conditional on
  CPUs and TPUs, a select per leaf on GPUs) leaves the update in place on the donated buffers
  (a select here made XLA CPU copy the old moments; test_attention checks a GPU step)."""
  _, pretraining, _ = _setup(mesh, tiny_model_config())
  compiled = pretraining.lower_train_step(make_phases(make_cfg())[0]).compile()
  assert state_copies(compiled) == []


def test_steps_compile_once_under_the_mesh(mesh):
  """Every call traces under the same mesh context: one compilation for many steps (a context
  that is entered only once makes the second call retrace without the mesh and its rules)."""
  model_config = tiny_model_config(dropout=0.1)
  cfg = make_cfg()
  pretraining = steps.Pretraining(model_config, cfg, mesh, make_phases(cfg))
  state = pretraining.init_state(jax.random.PRNGKey(0))
  step, evaluate = pretraining.train_step(make_phases(cfg)[0]), pretraining.eval_step
  for i in range(3):
    state, _ = step(state, synthetic_batch(i), jax.random.PRNGKey(0))
    evaluate(state.params, synthetic_batch(i))
  assert step.jitted._cache_size() == 1
  assert evaluate.jitted._cache_size() == 1


def test_bad_accumulation_rejected():
  loss = steps.pretraining_loss(tiny_model_config())
  with pytest.raises(UserError, match="grad_accum"):
    steps.make_train_step(loss, optax.sgd(0.1), lambda s: 0.1, grad_accum=0)


def test_dropout_is_on_and_keyed_by_rng_and_step(mesh):
  model_config = tiny_model_config(dropout=0.1)
  losses = {}
  for name, key in (("a", 1), ("b", 1), ("c", 2)):
    state, _, step = _setup(mesh, model_config)
    _, metrics = step(state, synthetic_batch(0), jax.random.PRNGKey(key))
    losses[name] = float(metrics["loss"])
  assert losses["a"] == losses["b"]
  assert losses["a"] != losses["c"]


def test_init_params_replace_random_values_and_keep_missing_heads(mesh):
  model_config = tiny_model_config()
  random_state, _, _ = _setup(mesh, model_config)
  given = {"bert": jax.tree.map(lambda x: np.full(x.shape, 0.5, np.float32),
                                _copy(random_state.params["bert"]))}
  state, pretraining, step = _setup(mesh, model_config, init_params=given)
  np.testing.assert_array_equal(
      state.params["bert"]["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"], 0.5)
  jax.tree.map(np.testing.assert_array_equal, _copy(state.params["cls"]),
               _copy(random_state.params["cls"]))
  assert state.params["bert"]["pooler"]["dense"]["kernel"].sharding == \
      pretraining.shardings.params["bert"]["pooler"]["dense"]["kernel"]
  state, metrics = step(state, synthetic_batch(0), jax.random.PRNGKey(0))
  assert metrics["finite"] == 1.0
  wrong = {"bert": {"embeddings": {"word_embeddings": {"embedding": np.zeros((3, 64))}}}}
  with pytest.raises(UserError, match="word_embeddings/embedding has shape"):
    _setup(mesh, model_config, init_params=wrong)


def test_bfloat16_compute_keeps_float32_master_weights(mesh):
  f32_state, _, f32_step = _setup(mesh, tiny_model_config())
  bf16_state, _, bf16_step = _setup(mesh, tiny_model_config(dtype="bfloat16"))
  batch = synthetic_batch(0)
  _, m32 = f32_step(f32_state, batch, jax.random.PRNGKey(0))
  bf16_state, m16 = bf16_step(bf16_state, batch, jax.random.PRNGKey(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16_state.params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16_state.opt_state)
             if jnp.issubdtype(x.dtype, jnp.floating))
  assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), abs=0.05)
  assert float(m16["loss"]) != float(m32["loss"])  # really computed in bfloat16


def test_lamb_per_phase_state_shards_and_trains(mesh):
  """The NVIDIA-style setup (LAMB, per-phase schedule, accumulation) builds and updates."""
  cfg = make_cfg(name="lamb", bias_correction=True, schedule="per_phase", warmup_steps=0)
  model_config = tiny_model_config()
  state, _, step = _setup(mesh, model_config, grad_accum=2, cfg=cfg)
  before = _copy(state.params)
  state, metrics = step(state, synthetic_batch(0), jax.random.PRNGKey(0))
  assert metrics["finite"] == 1.0 and float(metrics["learning_rate"]) == pytest.approx(1e-3)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, before)
  assert min(jax.tree.leaves(moved)) > 0.0


def _auto(mesh, cfg, model_config=None):
  return steps.Pretraining(model_config or tiny_model_config(dropout=0.1), cfg, mesh,
                           make_phases(cfg), auto_remat=True)


def test_auto_remat_keeps_activations_that_fit_and_compiles_the_step_once(mesh, caplog):
  """remat auto compiles the step without remat to read its peak memory; where that fits (a
  tiny step on this host) the same compile is what the step runs, given batches placed as the
  training loop places them."""
  cfg = make_cfg()
  pretraining = _auto(mesh, cfg)
  state = pretraining.init_state(jax.random.PRNGKey(0))
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    step = pretraining.train_step(make_phases(cfg)[0])
    for i in range(2):
      batch = sharding.global_batch(synthetic_batch(i), mesh)
      state, _ = step(state, batch, jax.random.PRNGKey(0))
  choice = pretraining.remat_choices[0]
  (level, peak), = choice.tried
  assert choice.remat is False and level is False
  assert 0 < peak <= mfu.HEADROOM * choice.capacity
  assert choice.describe().startswith("remat off: ") and " GiB without remat, of " in \
      choice.describe()
  compiles = [r for r in caplog.records if "XLA compilation of jit(train_step)" in r.getMessage()]
  assert len(compiles) == 1, [r.getMessage() for r in compiles]


def _flops(compiled) -> float | None:
  """XLA's FLOP count; None where the compiler gives none."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def test_auto_remat_recomputes_where_the_step_would_not_fit_and_every_level_trains_the_same(
    mesh, monkeypatch):
  """Chips too small for the steps below full remat get full remat (both tried). Each level
  trains the same numbers: "dots" recomputes all but the matmuls, full remat all."""
  cfg = make_cfg()
  phase = make_phases(cfg)[0]
  monkeypatch.setattr(steps.mfu, "memory_per_device", lambda device: 100e3)  # 100 kB chips
  auto = _auto(mesh, cfg)
  assert auto.remat(phase) is True
  assert [(level, peak > 100e3) for level, peak in auto.remat_choices[0].tried] == [
      (False, True), ("dots", True)]
  # each level's step as auto compiled it (full remat: compiled now), on batches placed as the
  # loop places them, so none is compiled twice
  levels = [auto._step(phase.grad_accum, level) for level in (False, "dots", True)]
  flops = [_flops(auto._lower(step, phase).compile()) for step in levels]
  if None not in flops:  # CPUs and TPUs count them
    assert flops[0] < flops[1] < flops[2] and flops[2] > 1.15 * flops[0]
  results = []
  for step in levels:
    state = auto.init_state(jax.random.PRNGKey(0))
    state, metrics = step(state, sharding.global_batch(synthetic_batch(0), mesh),
                          jax.random.PRNGKey(1))
    results.append((float(metrics["loss"]), _copy(state.params)))
  (loss, params), *recomputed = results
  for remat_loss, remat_params in recomputed:
    assert remat_loss == pytest.approx(loss, rel=1e-6)  # the same dropout bits, recomputed
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), remat_params, params)


def test_auto_remat_takes_a_compiler_out_of_memory_as_does_not_fit(mesh, monkeypatch):
  """TPU compilers refuse a program larger than the chip: full remat then."""
  cfg = make_cfg()
  phase = make_phases(cfg)[0]
  pretraining = _auto(mesh, cfg)
  real_lower = pretraining._lower

  class Refused:
    def compile(self):
      raise RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory "
                         "in memory space hbm. Used 21.34G of 15.75G hbm.")

  def lower(step, phase):
    refused = [pretraining._train_steps.get((1, level)) for level in (False, "dots")]
    return Refused() if step in refused else real_lower(step, phase)

  monkeypatch.setattr(pretraining, "_lower", lower)
  assert pretraining.remat(phase) is True
  assert pretraining.remat_choices[0].tried == ((False, None), ("dots", None))


def test_a_recorded_floor_skips_the_levels_below_and_escalation_stops_at_full(mesh):
  cfg = make_cfg()
  phase = make_phases(cfg)[0]
  pretraining = steps.Pretraining(tiny_model_config(), cfg, mesh, make_phases(cfg),
                                  auto_remat=True, remat_floors={0: "dots"})
  assert pretraining.remat(phase) == "dots"
  choice = pretraining.remat_choices[0]
  assert [level for level, _ in choice.tried] == ["dots"] and choice.ran_out == (False,)
  assert choice.describe().startswith("remat dots: ran out of memory without remat, ")
  assert pretraining.recompute(phase) and pretraining.remat(phase) is True
  assert pretraining.remat_choices[0].ran_out == (False, "dots")
  assert not pretraining.recompute(phase)  # nothing left above full remat
