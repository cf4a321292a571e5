"""Train states on a device mesh, for any Flax model and optax optimizer: abstract (shapes and
shardings, nothing computed: what `bert-jax plan` compiles against) and concrete (initialised
directly sharded, never whole on one device).

A model enters as `init_params_fn(key) -> boxed params` (flax `init` with logical-axis
metadata); `sharding.LOGICAL_AXIS_RULES` turn the metadata into NamedShardings, and the optimizer
state inherits its parameters' shardings.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bert_jax.errors import UserError
from bert_jax.training.sharding import LOGICAL_AXIS_RULES, logical_shardings, replicated

log = logging.getLogger(__name__)

InitParamsFn = Callable[[jax.Array], Any]  # key -> boxed params


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 scalar: the global step (number of updates attempted)
  params: Any           # float32 master weights
  opt_state: Any


def host_rng(rng):
  """Key data as a host array: jit can place it replicated on any mesh, one or many processes."""
  if isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  if isinstance(rng, jax.Array) and jax.process_count() > 1:
    rng = np.asarray(rng)
  return rng


ABSTRACT_RNG = jax.ShapeDtypeStruct((2,), jnp.uint32)  # a raw PRNGKey's key data


def _boxed_state(init_params_fn: InitParamsFn, optimizer, key) -> TrainState:
  params = init_params_fn(key)
  return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                    opt_state=optimizer.init(params))


def abstract_state(init_params_fn: InitParamsFn, optimizer, mesh: jax.sharding.Mesh
                   ) -> TrainState:
  """The train state as jax.ShapeDtypeStructs carrying their NamedShardings (an abstract
  evaluation of the init: no parameter is computed). `shardings_of` gives the shardings."""
  with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    boxed = jax.eval_shape(functools.partial(_boxed_state, init_params_fn, optimizer),
                           ABSTRACT_RNG)
    shardings = logical_shardings(mesh, boxed)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.unbox(boxed), shardings)


def shardings_of(abstract: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, abstract)


def create_state(init_params_fn: InitParamsFn, optimizer, mesh: jax.sharding.Mesh, rng,
                 init_params: Any = None, source: str = "init params"
                 ) -> tuple[TrainState, TrainState]:
  """-> (state, shardings). Params are initialised directly sharded; `init_params` (a plain
  pytree) replaces the random values where it has them (`merge_params`), and only the leaves
  it lacks are computed (the rest of the init is pruned from the compiled program)."""
  abstract = abstract_state(init_params_fn, optimizer, mesh)
  shardings = shardings_of(abstract)
  rng = host_rng(rng)
  with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    if init_params is None:  # one compiled init for everything
      state = jax.jit(lambda k: nn.unbox(_boxed_state(init_params_fn, optimizer, k)),
                      in_shardings=replicated(mesh), out_shardings=shardings)(rng)
      return state, shardings

    def init_only(keys):
      flat_shardings = traverse_util.flatten_dict(shardings.params)

      def pick(key):
        flat = traverse_util.flatten_dict(nn.unbox(init_params_fn(key)))
        return {k: flat[k] for k in keys}
      return jax.jit(pick, in_shardings=replicated(mesh),
                     out_shardings={k: flat_shardings[k] for k in keys})(rng)
    params = merge_params(abstract.params, init_params, init_only, source)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  step = jax.jit(lambda: jnp.zeros([], jnp.int32), out_shardings=shardings.step)()
  return TrainState(step=step, params=params, opt_state=opt_state), shardings


def merge_params(abstract_params: Any, given: Any, init_only: Callable[[list], dict],
                 source: str = "init params") -> Any:
  """The one merge rule of pretrained into fresh params: every leaf `given` has at the same path
  and shape is taken (placed with the abstract leaf's sharding; safe with several processes
  since each holds the full host value). The encoder ("bert/...") must fit; a head that is
  missing or has another shape (another num_labels, vocab) is freshly initialised by
  `init_only(paths)` -> {path: array}, and the run says so."""
  flat_abstract = traverse_util.flatten_dict(abstract_params)
  flat_given = traverse_util.flatten_dict(flax.core.unfreeze(given))
  unused = sorted("/".join(k) for k in flat_given if k not in flat_abstract)
  if unused:
    log.warning("%s: tensors not in the model (ignored): %s", source, ", ".join(unused[:10]))
  out, fresh = {}, []
  for key, leaf in flat_abstract.items():
    value = flat_given.get(key)
    if value is not None and tuple(np.shape(value)) != tuple(leaf.shape):
      if key[0] == "bert":
        raise UserError(f"{source}: tensor {'/'.join(key)} has shape {np.shape(value)}; the "
                        f"model expects {tuple(leaf.shape)} (check the model config against "
                        "the checkpoint)")
      value = None
    if value is None:
      fresh.append(key)
      continue
    value = np.asarray(value, dtype=leaf.dtype)
    out[key] = jax.make_array_from_callback(value.shape, leaf.sharding,
                                            lambda idx, v=value: v[idx])
  if fresh:
    out.update(init_only(fresh))
    if jax.process_index() == 0:
      parts = sorted({"/".join(k[:2]) if k[0] == "bert" else k[0] for k in fresh})
      print(f"freshly initialised: {', '.join(parts)} ({len(fresh)} tensors not in {source})",
            file=sys.stderr, flush=True)
  return traverse_util.unflatten_dict(out)
