"""How a checkpoint is judged sound: a params fingerprint saved with each step (a step whose
files restore "successfully" but wrongly, e.g. a deleted chunk read back as zeros, fails it),
the one fall-back rule of both readers past a damaged step, and one-line descriptions of damage
and of a saved tree that is another model's."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Sequence, TypeVar

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from bert_jax.errors import UserError, drop_closed_loop_noise, first_line

T = TypeVar("T")


@jax.jit
def _leaf_sums(params: Any) -> list[jax.Array]:
  leaves = jax.tree.leaves(params)
  return [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.abs(x.astype(jnp.float32)))])
          for x in leaves]


def params_fingerprint(params: Any) -> list[list[float]]:
  """[sum, sum of |x|] per leaf, in tree order (a host sync)."""
  return [[float(a), float(b)] for a, b in jax.device_get(_leaf_sums(params))]


def fingerprint_is_finite(fingerprint: Sequence[Sequence[float]]) -> bool:
  return all(math.isfinite(v) for pair in fingerprint for v in pair)


def fingerprints_match(saved: Sequence[Sequence[float]], restored: Sequence[Sequence[float]],
                       rtol: float = 1e-4) -> bool:
  if len(saved) != len(restored):
    return False
  for (s, sa), (r, ra) in zip(saved, restored):
    scale = max(abs(sa), abs(ra), 1e-30)
    if abs(sa - ra) > rtol * scale or abs(s - r) > rtol * scale:
      return False
  return True


_QUOTED_FILE = re.compile(r'(?:local )?file "([^"]+)"')
_OBJECT_REPR = re.compile(r"<[^<>]*(?: object at 0x[0-9a-f]+|bound method)[^<>]*>")


def describe_damage(error: BaseException, limit: int = 240) -> str:
  """Why a checkpoint did not restore, in one line that names the damaged file: tensorstore's
  message without its JSON spec, the innermost file it names; object reprs dropped."""
  text = str(error).split(" [tensorstore_spec")[0].strip()
  files = _QUOTED_FILE.findall(text)
  line = f"{files[-1]}: {text.splitlines()[0].rsplit(': ', 1)[-1]}" if files else \
      first_line(error, 10 * limit)
  while _OBJECT_REPR.search(line):  # innermost first: <bound method f of <X object at 0x..>>
    line = _OBJECT_REPR.sub("...", line)
  return line[:limit]


def check_fingerprint(meta: dict, params: Any) -> None:
  if "fingerprint" in meta and not fingerprints_match(meta["fingerprint"],
                                                      params_fingerprint(params)):
    raise ValueError("restored parameters do not match the fingerprint saved with them")


def first_restorable(candidates: Iterable[T], restore: Callable[[T], Any]
                      ) -> tuple[tuple[T, Any] | None, list[tuple[T, str]]]:
  """The fall-back rule of both readers: `restore` each of `candidates` (newest first) until
  one restores. Returns ((candidate, restored) or None, [(candidate, why)] for those passed
  over), so that each reader words its own warnings."""
  damaged = []
  drop_closed_loop_noise()  # a damaged step's failed restore would print tracebacks
  for candidate in candidates:
    try:
      return (candidate, restore(candidate)), damaged
    except UserError:  # not damage (e.g. a step written for another model): nothing passed over
      raise
    except Exception as e:  # any damage: missing item, truncated file, bad JSON, bad fingerprint
      damaged.append((candidate, describe_damage(e)))
  return None, damaged


def _leaf_name(path: tuple) -> str:
  """A pytree path as orbax names the array it saves ("opt_state" item: "0.mu.bert.w")."""
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def structure_mismatch(item_dir: epath.Path, abstract: Any) -> str | None:
  """How a saved pytree item differs in names or shapes from `abstract`, or None when it
  matches or its metadata cannot be read (which is damage, not a mismatch)."""
  try:
    tree = ocp.StandardCheckpointHandler().metadata(item_dir).tree
  except Exception:  # unreadable metadata: damage, for the caller's fall-back
    return None
  def shapes(t):  # empty nodes (optax's EmptyState; None in the metadata) count too
    empty = lambda x: x is None or (isinstance(x, (tuple, list, dict)) and not x)
    return {_leaf_name(p): tuple(x.shape) if hasattr(x, "shape") else "empty"
            for p, x in jax.tree_util.tree_leaves_with_path(t, is_leaf=empty)}
  saved = shapes(tree)
  wanted = shapes(ocp.tree.serialize_tree(abstract, keep_empty_nodes=True))
  if saved == wanted:
    return None
  missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
  resized = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
  parts = [f"{k} saved as {saved[k]}, the config makes {wanted[k]}" for k in resized[:2]]
  if missing:
    parts.append(f"{len(missing)} arrays of the config's are not in it (e.g. {missing[0]})")
  if extra:
    parts.append(f"{len(extra)} saved arrays the config does not make (e.g. {extra[0]})")
  return "; ".join(parts)
