"""Pure train and eval steps for any Loss (pretraining's MLM + NSP, each fine-tuning task's),
jitted on a mesh, and the pretraining state (abstract or directly sharded).

Pretraining loss: MLM cross-entropy at the masked positions, weighted by masked_lm_weights and
averaged over the real predictions of the whole global batch, plus (objective mlm_nsp) NSP
cross-entropy averaged over sequences; both in float32. Objective mlm has no NSP term and no
nsp_* metrics (the NSP head is still in the model, untrained). MLM logits are computed only
at the gathered positions (never [B,T,V]).

Gradient accumulation scans over micro-batches inside the jitted step. Each micro-batch's loss
is normalised by the *global* batch's prediction count, so the summed gradients equal one big
batch's (to float rounding).

The dropout rng of step s is fold_in(rng, s) (and fold_in(., i) for micro-batch i): stateless,
so a resumed run is bit-exact, and independent of the mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bert_jax.config import BertConfig
from bert_jax.data import batch as batch_lib
from bert_jax.devices import mfu
from bert_jax.errors import UserError
from bert_jax.modeling import ops
from bert_jax.modeling.heads import BertForPreTraining
from bert_jax.training import remat as remat_lib
from bert_jax.training import state as state_lib
from bert_jax.training.optim import make_optimizer
from bert_jax.training.phases import Phase
from bert_jax.training.sharding import LOGICAL_AXIS_RULES, batch_sharding, replicated
from bert_jax.training.state import TrainState, host_rng

log = logging.getLogger(__name__)

NAN_POLICIES = ("skip", "stop")
OBJECTIVES = ("mlm_nsp", "mlm")


# ----------------------------------------------------------------------------- state

def _init_inputs(model_config: BertConfig):
  seq = min(8, model_config.max_position_embeddings)
  ids = jnp.zeros((1, seq), jnp.int32)
  return ids, ids, jnp.ones((1, seq), jnp.int32)


def _init_params_fn(model_config: BertConfig):
  model, inputs = BertForPreTraining(model_config), _init_inputs(model_config)
  return lambda key: model.init({"params": key}, *inputs)["params"]


# ----------------------------------------------------------------------------- losses

@dataclasses.dataclass(frozen=True)
class Loss:
  """A training objective as sums over rows (nanodo's LossFn, made accumulable): the objective
  is sum(sums[s] / counts[c] for s, c in terms) with the counts of the GLOBAL batch, so the
  gradients of micro-batches simply add up to one big batch's.

  sums(params, batch, key) -> additive sums of the (micro-)batch: losses, hits and the counts
    themselves; `key` is the dropout key, None for a deterministic pass.
  counts(batch) -> the denominators, from the batch alone (e.g. real predictions, rows).
  metrics(sums) -> means and whatever else a metrics row shows; must hold "loss".
  """
  sums: Callable[[Any, Mapping[str, jax.Array], jax.Array | None], dict[str, jax.Array]]
  counts: Callable[[Mapping[str, jax.Array]], dict[str, jax.Array]]
  terms: tuple[tuple[str, str], ...]
  metrics: Callable[[Mapping[str, jax.Array]], dict[str, jax.Array]]

  def objective(self, sums: Mapping[str, jax.Array], counts: Mapping[str, jax.Array]):
    return sum(sums[s] / jnp.maximum(counts[c], 1e-6) for s, c in self.terms)


def check_objective(objective: str) -> None:
  """UserError unless `objective` is one this module builds a loss for (checked when the
  config is validated, and again by pretraining_loss for direct callers)."""
  if objective not in OBJECTIVES:
    raise UserError(f"--config.objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")


def pretraining_loss(model_config: BertConfig, objective: str = "mlm_nsp") -> Loss:
  """MLM + NSP: MLM cross-entropy at the gathered positions averaged over the real predictions,
  NSP cross-entropy averaged over sequences, both in float32. Objective "mlm": the MLM term
  alone, and the nsp_* sums and metrics are absent."""
  check_objective(objective)
  with_nsp = objective == "mlm_nsp"
  model = BertForPreTraining(model_config)
  deterministic = (model_config.hidden_dropout_prob == 0.0
                   and model_config.attention_probs_dropout_prob == 0.0)

  def counts(batch):
    return dict(mlm_weight=jnp.sum(batch["masked_lm_weights"].astype(jnp.float32)),
                num_sequences=jnp.asarray(batch["input_ids"].shape[0], jnp.float32))

  def sums(params, batch, key):
    mlm_logits_BPV, nsp_logits_B2 = model.apply(
        {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
        masked_positions=batch["masked_lm_positions"],
        deterministic=key is None or deterministic,
        rngs=None if key is None else {"dropout": key})
    ids_BP = batch["masked_lm_ids"].astype(jnp.int32)
    w_BP = batch["masked_lm_weights"].astype(jnp.float32)
    mlm_nll_BP, mlm_hit_BP = ops.cross_entropy(mlm_logits_BPV, ids_BP)
    out = dict(mlm_loss_sum=jnp.sum(w_BP * mlm_nll_BP), mlm_hits=jnp.sum(w_BP * mlm_hit_BP),
               **counts(batch))
    if with_nsp:
      labels_B = batch["next_sentence_label"].reshape(-1).astype(jnp.int32)
      nsp_nll_B = optax.softmax_cross_entropy_with_integer_labels(nsp_logits_B2, labels_B)
      nsp_hit_B = (jnp.argmax(nsp_logits_B2, -1) == labels_B).astype(jnp.float32)
      out.update(nsp_loss_sum=jnp.sum(nsp_nll_B), nsp_hits=jnp.sum(nsp_hit_B))
    return out

  def metrics(sums):
    mlm_den = jnp.maximum(sums["mlm_weight"], 1e-6)
    mlm_loss = sums["mlm_loss_sum"] / mlm_den
    out = dict(loss=mlm_loss, mlm_loss=mlm_loss, mlm_accuracy=sums["mlm_hits"] / mlm_den,
               mlm_weight=sums["mlm_weight"], num_sequences=sums["num_sequences"])
    if with_nsp:
      nsp_den = jnp.maximum(sums["num_sequences"], 1.0)
      nsp_loss = sums["nsp_loss_sum"] / nsp_den
      out.update(loss=mlm_loss + nsp_loss, nsp_loss=nsp_loss,
                 nsp_accuracy=sums["nsp_hits"] / nsp_den)
    return out

  terms = (("mlm_loss_sum", "mlm_weight"),) + (
      (("nsp_loss_sum", "num_sequences"),) if with_nsp else ())
  return Loss(sums=sums, counts=counts, metrics=metrics, terms=terms)


def _micro_batches(batch: Mapping[str, jax.Array], grad_accum: int) -> dict[str, jax.Array]:
  """[B, ...] -> [A, B/A, ...] by batch.split_micro (finetune's batching joins by its
  inverse), constrained inside the jitted step so each device keeps its rows."""
  def split(x):
    x = batch_lib.split_micro(x, grad_accum)
    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))
  return {k: split(v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- train step

def make_train_step(loss: Loss, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum: int = 1) -> Callable:
  """-> train_step(state, batch, rng) -> (state, metrics), pure, for any Loss (pretraining's
  MLM + NSP, each fine-tuning task's).

  `rng` is the run's base key; the step uses fold_in(rng, state.step). With grad_accum > 1 the
  batch's rows are scanned as grad_accum micro-batches. A non-finite loss or gradient leaves
  params and opt_state unchanged (the step still advances, metrics report finite=0) under both
  nan policies, so the step does not depend on one; under "stop" the loop ends the run on
  finite=0.
  """
  if grad_accum < 1:
    raise UserError(f"grad_accum={grad_accum}: expected a positive integer")

  def micro_objective(params, micro, key, counts):
    sums = loss.sums(params, micro, key)
    return loss.objective(sums, counts), sums

  grad_fn = jax.grad(micro_objective, has_aux=True)
  update = make_update(optimizer, schedule)

  def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng):
    step_rng = jax.random.fold_in(rng, state.step)
    counts = loss.counts(batch)
    if grad_accum == 1:
      grads, sums = grad_fn(state.params, batch, step_rng, counts)
    else:
      micros = _micro_batches(batch, grad_accum)

      def body(carry, xs):
        micro, i = xs
        g, s = grad_fn(state.params, micro, jax.random.fold_in(step_rng, i), counts)
        return jax.tree.map(jnp.add, carry, (g, s)), None

      first = jax.tree.map(lambda x: x[0], micros)
      zeros = jax.tree.map(jnp.zeros_like,
                           jax.eval_shape(grad_fn, state.params, first, step_rng, counts))
      (grads, sums), _ = jax.lax.scan(body, zeros, (micros, jnp.arange(grad_accum)))
    return update(state, grads, loss.metrics(sums))

  return train_step


def make_update(optimizer: optax.GradientTransformation, schedule: optax.Schedule) -> Callable:
  """-> update(state, grads, metrics) -> (state, metrics): the part of a train step after the
  gradients (clipping, the optimizer, the finiteness guard), once per step whatever the
  accumulation (`bert-jax plan` compiles it alone to count accumulated FLOPs right)."""

  def update(state: TrainState, grads: Any, metrics: dict) -> tuple[TrainState, dict]:
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

    def apply(_):
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params,
                                            global_step=state.step)
      return optax.apply_updates(state.params, updates), opt_state

    def keep(_):
      return state.params, state.opt_state

    def select():
      keep_finite = lambda new, old: jnp.where(finite, new, old)
      return jax.tree.map(keep_finite, apply(None), keep(None))

    # Either way the donated state's buffers are updated in place, each on its compilers. On
    # GPUs XLA copies a conditional's results out (params and both moments, every step), but a
    # select per leaf fuses into the update's kernels. On CPUs and TPUs the conditional is in
    # place, while a select grows the temporaries (XLA CPU recomputes the new moments inside
    # the params' kernel, so it copies the old ones).
    params, opt_state = jax.lax.platform_dependent(
        cuda=select, rocm=select, default=lambda: jax.lax.cond(finite, apply, keep, None))
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule(state.step),
                   finite=finite.astype(jnp.float32))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return update


class MeshStep:
  """A jitted step that is always traced under its mesh and the logical-axis rules (so the
  model's sharding constraints apply), called with concrete arrays or lowered with abstract
  ones (`lower(...).compile()` for the mesh's devices, which may be a TPU topology's).
  A fresh context per call: the trace-cache key includes the active mesh."""

  def __init__(self, fn: Callable, mesh: jax.sharding.Mesh, **jit_kwargs: Any):
    self.mesh = mesh
    self.jitted = jax.jit(fn, **jit_kwargs)

  @contextlib.contextmanager
  def _context(self):
    with nn.logical_axis_rules(LOGICAL_AXIS_RULES), jax.set_mesh(self.mesh):
      yield

  def __call__(self, *args):
    with self._context():
      return self.jitted(*args)

  def lower(self, *args) -> jax.stages.Lowered:
    with self._context():
      return self.jitted.lower(*args)


class _TrainStep(MeshStep):
  def __call__(self, state, batch, rng):
    return super().__call__(state, batch, host_rng(rng))


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh, shardings: Any) -> MeshStep:
  """train_step jitted with the state's shardings, the batch split over (data, fsdp), the
  state donated. Lower it with (abstract state, `data.batch.abstract_batch(...)`,
  ABSTRACT_RNG); `Pretraining.lower_train_step` does."""
  return _TrainStep(train_step, mesh,
                    in_shardings=(shardings, batch_sharding(mesh), replicated(mesh)),
                    out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))


# ----------------------------------------------------------------------------- eval step

def make_eval_step(loss: Loss) -> Callable:
  """-> eval_step(params, batch) -> loss.sums of one deterministic pass. An evaluation adds
  the sums of its batches up and calls loss.metrics once (`eval_metrics`), so every mean is
  over all its predictions and rows, whatever the objective."""

  def eval_step(params, batch):
    return loss.sums(params, batch, None)

  return eval_step


def eval_metrics(loss: Loss, batch_sums: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """loss.metrics of the sums of several eval batches (fetched to the host), as floats."""
  totals = {k: sum(float(s[k]) for s in batch_sums) for k in batch_sums[0]}
  return {k: float(v) for k, v in loss.metrics(totals).items()}


def jit_eval_step(eval_step: Callable, mesh: jax.sharding.Mesh, shardings: Any) -> MeshStep:
  """`shardings`: the train state's shardings (or just the params')."""
  param_shardings = shardings.params if isinstance(shardings, TrainState) else shardings
  return MeshStep(eval_step, mesh, in_shardings=(param_shardings, batch_sharding(mesh)),
                  out_shardings=replicated(mesh))


# ----------------------------------------------------------------------------- the whole build

class Pretraining:
  """One model's pretraining on one mesh, built once: what `bert-jax pretrain` runs and
  `bert-jax plan` compiles. The optimizer, schedule and shardings stay inside.

  abstract_state   the state as ShapeDtypeStructs with their shardings (nothing computed);
                   `shardings` alone
  init_state(rng, init_params=None)   the state, initialised directly sharded; `init_params`
                   (a plain pytree) replaces the random values where it has them
  train_step(phase)   the phase's jitted step (one per accumulation and remat, compiled per
                   shape); `lower_train_step(phase)` lowers it with abstract arguments (AOT)
  eval_step        the jitted deterministic pass returning the loss's sums
  update_step      the update alone (`plan` counts the FLOPs of accumulated steps with it)

  auto_remat: each phase's step recomputes in the backward pass only as much as it must to fit
  a chip (training/remat.py; model_config.remat is then ignored): the levels' steps are compiled
  in turn and their peaks read (the compiles are cached, so the chosen step is compiled once);
  `remat_choices` holds what was chosen per phase. `remat_floors`: phase index -> the least
  level to try (the ones below ran out of memory in an earlier start).
  """

  def __init__(self, model_config: BertConfig, cfg: Any, mesh: jax.sharding.Mesh,
               phases: Sequence[Phase], objective: str = "mlm_nsp", auto_remat: bool = False,
               remat_floors: Mapping[int, bool | str] | None = None):
    self.mesh = mesh
    self.loss = pretraining_loss(model_config, objective)
    self._model_config, self._objective, self._auto_remat = model_config, objective, auto_remat
    self._losses = {model_config.remat: self.loss}  # by remat: the same parameters either way
    self._optimizer, self._schedule = make_optimizer(cfg, phases)
    self._init_params_fn = _init_params_fn(model_config)
    self.abstract_state = state_lib.abstract_state(self._init_params_fn, self._optimizer, mesh)
    self.shardings = state_lib.shardings_of(self.abstract_state)
    self._train_steps: dict[tuple[int, bool | str], MeshStep] = {}
    self._remat_floors = dict(remat_floors or {})
    self.remat_choices: dict[int, remat_lib.RematChoice] = {}

  def init_state(self, rng, init_params: Any = None) -> TrainState:
    return state_lib.create_state(self._init_params_fn, self._optimizer, self.mesh, rng,
                                  init_params=init_params)[0]

  def remat(self, phase: Phase) -> bool | str:
    """How much the phase's step recomputes in the backward pass (config.REMATS)."""
    if not self._auto_remat:
      return self._model_config.remat
    if phase.index not in self.remat_choices:
      self.remat_choices[phase.index] = remat_lib.choose(
          lambda level: self._lower(self._step(phase.grad_accum, level), phase).compile(),
          mfu.memory_per_device(self.mesh.devices.flat[0]),
          self._remat_floors.get(phase.index, False))
    return self.remat_choices[phase.index].remat

  def recompute(self, phase: Phase) -> bool:
    """After the phase's step ran out of device memory: True where auto can recompute more, and
    the phase's step does from now on; False where nothing is left to change."""
    choice = self.remat_choices.get(phase.index)
    escalated = choice and choice.escalated()
    if escalated:
      self.remat_choices[phase.index] = escalated
    return bool(escalated)

  def train_step(self, phase: Phase) -> MeshStep:
    """The same under every nan_policy (the loop applies it)."""
    return self._step(phase.grad_accum, self.remat(phase))

  def _step(self, grad_accum: int, remat: bool | str) -> MeshStep:
    if (grad_accum, remat) not in self._train_steps:
      if remat not in self._losses:
        self._losses[remat] = pretraining_loss(self._model_config.replace(remat=remat),
                                               self._objective)
      self._train_steps[grad_accum, remat] = jit_train_step(
          make_train_step(self._losses[remat], self._optimizer, self._schedule,
                          grad_accum=grad_accum), self.mesh, self.shardings)
    return self._train_steps[grad_accum, remat]

  def lower_train_step(self, phase: Phase) -> jax.stages.Lowered:
    """The phase's step lowered for the mesh's devices (a TPU topology's, say), nothing run."""
    return self._lower(self.train_step(phase), phase)

  def _lower(self, step: MeshStep, phase: Phase) -> jax.stages.Lowered:
    batch = batch_lib.abstract_batch(batch_sharding(self.mesh), phase.batch_size, phase.seq_len,
                                     phase.max_predictions)
    return step.lower(self.abstract_state, batch, state_lib.ABSTRACT_RNG)

  @functools.cached_property
  def eval_step(self) -> MeshStep:
    return jit_eval_step(make_eval_step(self.loss), self.mesh, self.shardings)

  @functools.cached_property
  def update_step(self) -> MeshStep:
    """update(state, grads, metrics), lowered with (abstract state, its params, {"loss"})."""
    return MeshStep(make_update(self._optimizer, self._schedule), self.mesh,
                    in_shardings=(self.shardings, self.shardings.params,
                                  replicated(self.mesh)),
                    out_shardings=(self.shardings, replicated(self.mesh)))
