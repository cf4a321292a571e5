"""Checkpointer: async orbax saves, retention, data state, damaged-checkpoint fallback."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bert_jax.config import get_preset, write_config_json
from bert_jax.errors import UserError
from bert_jax.storage.checkpoint import Checkpointer, abstract_like, load_checkpoint


def tree(value: float):
  return {"bert": {"w": jnp.full((4, 3), value, jnp.float32), "b": jnp.arange(3.0) + value},
          "cls": {"bias": jnp.full((5,), -value)}}


@pytest.fixture
def saved(tmp_path):
  """A workdir with checkpoints 2, 4, 6, 8 (params of step s filled with s)."""
  opt = optax.adam(1e-3)
  ck = Checkpointer(str(tmp_path), keep_last=10)
  for step in (2, 4, 6, 8):
    params = tree(float(step))
    ck.save(step, params=params, opt_state=opt.init(params), meta={"phase": 0},
            data_state=b'{"next": %d}' % step)
  ck.wait()
  return tmp_path, ck, abstract_like(tree(0.0)), abstract_like(opt.init(tree(0.0)))


def restore_step(ck, ap, ao):
  r = ck.restore(ap, ao)
  return None if r is None else r.step


def test_roundtrip_params_opt_state_meta_data(saved):
  _, ck, ap, ao = saved
  r = ck.restore(ap, ao)
  assert r.step == 8 and r.meta["phase"] == 0 and r.meta["step"] == 8
  np.testing.assert_array_equal(r.params["bert"]["w"], np.full((4, 3), 8.0))
  assert r.data_state == {"next": 8}
  assert int(r.opt_state[0].count) == 0
  assert ck.restore(ap, ao, want_data=lambda meta: False).data_state is None
  ck.close()


def test_layout_is_what_load_pretrained_reads(saved):
  path, ck, _, _ = saved
  ck.close()
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as c:
    params = c.restore(path / "checkpoints" / "8" / "params")
  np.testing.assert_array_equal(params["cls"]["bias"], np.full((5,), -8.0))
  assert {"data", "meta", "opt_state", "params"} <= set(os.listdir(path / "checkpoints" / "8"))


def _data_files(d: pathlib.Path):
  return [p for p in d.rglob("*") if p.is_file() and p.parent.name == "d"]


@pytest.mark.parametrize("damage", ["garble_chunks", "delete_chunks", "drop_meta", "truncate_meta",
                                    "drop_data", "drop_opt_state"])
def test_damaged_newest_falls_back_with_warning(saved, damage):
  path, ck, ap, ao = saved
  step_dir = path / "checkpoints" / "8"
  if damage == "garble_chunks":
    for f in _data_files(step_dir / "params"):
      f.write_bytes(b"\0" * 16)
  elif damage == "delete_chunks":
    for f in _data_files(step_dir / "params"):
      f.unlink()
  elif damage == "drop_meta":
    shutil.rmtree(step_dir / "meta")
  elif damage == "truncate_meta":
    meta = next(p for p in (step_dir / "meta").rglob("*") if p.is_file())
    meta.write_text(meta.read_text()[:10])
  elif damage == "drop_data":
    shutil.rmtree(step_dir / "data")
  else:
    shutil.rmtree(step_dir / "opt_state")
  with pytest.warns(UserWarning, match="checkpoints/8 is incomplete or corrupt") as caught:
    r = ck.restore(ap, ao)
  assert r.step == 6
  message = next(str(w.message) for w in caught if "checkpoints/8 is" in str(w.message))
  assert "object at 0x" not in message and "bound method" not in message
  assert "tensorstore_spec" not in message and "\n" not in message
  if damage in ("garble_chunks", "delete_chunks"):   # names the damaged file itself
    assert f"({step_dir / 'params'}/" in message, message
  np.testing.assert_array_equal(r.params["bert"]["w"], np.full((4, 3), 6.0))
  # set aside for inspection, out of the way of a new save of step 8
  assert ck.all_steps() == [2, 4, 6]
  assert [p.name.split("-")[0] for p in (path / "checkpoints").glob("8.corrupt-*")] == ["8.corrupt"]
  p = tree(8.5)
  assert ck.save(8, params=p, opt_state=optax.adam(1e-3).init(p), meta={})
  ck.wait()
  assert ck.restore(ap, ao, want_data=lambda m: False).params["cls"]["bias"][0] == -8.5
  ck.close()


def test_partial_step_directory_and_killed_save_are_passed_over(saved):
  path, ck, ap, ao = saved
  ck.close()
  # A step directory with only some items (as a copy cut short would leave) and an orbax
  # temporary directory of a save killed before its commit.
  partial = path / "checkpoints" / "10"
  shutil.copytree(path / "checkpoints" / "8" / "params", partial / "params")
  shutil.copytree(path / "checkpoints" / "8", path / "checkpoints" / "12.orbax-checkpoint-tmp-1")
  ck = Checkpointer(str(path), keep_last=10)
  with pytest.warns(UserWarning, match="checkpoints/10 is incomplete"):
    assert restore_step(ck, ap, ao) == 8
  ck.close()


def _tree_bytes(root: pathlib.Path) -> dict:
  return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}


@pytest.mark.parametrize("change", ["params", "opt_state"])
def test_a_step_written_for_another_model_or_optimizer_is_refused_not_set_aside(saved, change):
  """Every good step used to fail to restore ("tree structures do not match"), be renamed
  N.corrupt-* and training restarted at step 0."""
  path, ck, ap, ao = saved
  before = _tree_bytes(path / "checkpoints")
  other = dict(tree(0.0), cls={"bias": jnp.zeros((7,))})   # another vocab: another head
  if change == "params":
    ap = abstract_like(other)
  else:
    ao = abstract_like(optax.lamb(1e-3).init(tree(0.0)))
  with pytest.raises(UserError) as e:
    ck.restore(ap, ao)
  message = str(e.value)
  assert message.startswith(f"{path / 'checkpoints' / '8'}: its {change} were written for "
                            "another model or optimizer config") and "\n" not in message
  if change == "params":
    assert "cls.bias saved as (5,), the config makes (7,)" in message
  assert "left as it is" in message
  assert ck.all_steps() == [2, 4, 6, 8] and _tree_bytes(path / "checkpoints") == before
  ck.close()


def _disk_full_from_save(monkeypatch, after: int = 0):
  """The meta item's writer raises ENOSPC from its (`after` + 1)-th save on."""
  import errno

  import orbax.checkpoint as ocp
  real, calls = ocp.JsonCheckpointHandler.async_save, {"n": 0}

  async def full(self, directory, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] > after:
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await real(self, directory, *args, **kwargs)
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", full)


def test_a_full_disk_is_one_user_error_naming_the_step_and_free_space(saved, monkeypatch):
  """It used to be 872 lines of tracebacks, exit 1, and two more steps of training."""
  path, ck, ap, ao = saved
  _disk_full_from_save(monkeypatch)
  p = tree(10.0)
  with pytest.raises(UserError) as e:
    ck.save(10, params=p, opt_state=optax.adam(1e-3).init(p), meta={})
  message = str(e.value)
  assert message.startswith(f"{path / 'checkpoints' / '10'}: no space left on device (")
  assert " MiB free in " in message and "the last complete one is step 8" in message
  assert "\n" not in message
  ck.close()   # the failure was reported once: closing adds nothing
  assert ck.all_steps() == [2, 4, 6, 8]


def test_all_damaged_returns_none(saved):
  path, ck, ap, ao = saved
  for step in ck.all_steps():
    shutil.rmtree(path / "checkpoints" / str(step) / "meta")
  with pytest.warns(UserWarning):
    assert ck.restore(ap, ao) is None
  ck.close()


def test_nonfinite_params_are_never_saved(saved):
  path, ck, ap, ao = saved
  bad = tree(10.0)
  bad["bert"]["w"] = bad["bert"]["w"].at[0, 0].set(jnp.nan)
  with pytest.warns(UserWarning, match="not finite; checkpoint not written"):
    assert not ck.save(10, params=bad, opt_state=optax.adam(1e-3).init(bad), meta={})
  ck.wait()
  assert ck.latest_step() == 8 and restore_step(ck, ap, ao) == 8
  ck.close()


def test_retention_keeps_last_n_every_kth_and_boundaries(tmp_path):
  ck = Checkpointer(str(tmp_path), keep_last=2, keep_every=4, keep_steps=[3], async_save=False)
  opt = optax.sgd(0.1)
  for step in range(1, 11):
    p = tree(float(step))
    ck.save(step, params=p, opt_state=opt.init(p), meta={})
  ck.wait()
  assert ck.all_steps() == [3, 4, 8, 9, 10]
  ck.close()


def test_dict_data_state_roundtrip(tmp_path):
  ck = Checkpointer(str(tmp_path))
  p = tree(1.0)
  state = {"epoch": 2, "index": [1, 2, 3]}
  ck.save(1, params=p, opt_state=optax.sgd(0.1).init(p), meta={}, data_state=state)
  ck.wait()
  assert ck.restore(abstract_like(p), abstract_like(optax.sgd(0.1).init(p))).data_state == state
  ck.close()


def test_data_item_is_grains_own_format(saved):
  """One file per process, holding the iterator's get_state() JSON as grain's handler writes
  it, so grain's handler reads what bert-jax wrote and the other way round."""
  path, ck, _, _ = saved
  ck.close()
  data = path / "checkpoints" / "8" / "data"
  assert sorted(p.name for p in data.glob("*.json")) == ["process_0-of-1.json"]
  assert json.loads((data / "process_0-of-1.json").read_text()) == {"next": 8}
  meta = json.loads((path / "checkpoints" / "8" / "_CHECKPOINT_METADATA").read_text())
  assert meta["item_handlers"]["data"].startswith("grain.")


OLD_LAYOUT = pathlib.Path(__file__).parent / "data" / "old_data_layout"


def test_checkpoints_of_the_own_data_handler_still_restore(tmp_path):
  """tests/data/old_data_layout was written by bert-jax's own DataStateHandler (before grain's
  handler replaced it): step 2 with a BatchIterator state, step 4 with the bytes of a grain
  DataLoader state."""
  shutil.copytree(OLD_LAYOUT, tmp_path / "work")
  opt = optax.adam(1e-3)
  ck = Checkpointer(str(tmp_path / "work"), keep_last=10)
  ap, ao = abstract_like(tree(0.0)), abstract_like(opt.init(tree(0.0)))
  r = ck.restore(ap, ao)
  assert r.step == 4 and r.data_state["last_seen_indices"] == {"0": 47}
  np.testing.assert_array_equal(r.params["bert"]["w"], np.full((4, 3), 4.0))
  ck.close()
  shutil.rmtree(tmp_path / "work" / "checkpoints" / "4")
  ck = Checkpointer(str(tmp_path / "work"), keep_last=10)
  r = ck.restore(ap, ao)
  assert r.step == 2 and r.data_state["format"] == "bert-jax-batches"
  assert r.data_state["next_record"] == 48
  # and the resumed run's next save is in grain's format beside it
  p = tree(6.0)
  ck.save(6, params=p, opt_state=opt.init(p), meta={}, data_state={"next_record": 60})
  ck.wait()
  assert ck.restore(ap, ao).data_state == {"next_record": 60}
  ck.close()


def test_both_readers_pass_over_params_that_restore_but_are_not_the_saved_ones(saved, capsys):
  """Step 8's params replaced by step 6's restore cleanly but fail the fingerprint saved with
  step 8: resuming and load_pretrained (load_checkpoint) both fall back to step 6."""
  path, ck, ap, ao = saved
  ck.close()
  step8 = path / "checkpoints" / "8"
  shutil.rmtree(step8 / "params")
  shutil.copytree(path / "checkpoints" / "6" / "params", step8 / "params")
  write_config_json(get_preset("tiny"), str(path / "config.json"))
  config, params, params_dir = load_checkpoint(path)
  assert config.num_hidden_layers == get_preset("tiny").num_hidden_layers
  assert params_dir.parent.name == "6" and params["bert"]["w"][0, 0] == 6.0
  err = capsys.readouterr().err
  assert f"warning: {step8 / 'params'}: cannot restore (" in err and "fingerprint" in err
  assert err.count("\n") == 1
  ck = Checkpointer(str(path), keep_last=10)
  with pytest.warns(UserWarning, match="checkpoints/8 is incomplete or corrupt.*fingerprint"):
    assert restore_step(ck, ap, ao) == 6
  ck.close()


def test_load_checkpoint_with_nothing_restorable_is_one_user_error(saved, capsys):
  path, ck, _, _ = saved
  ck.close()
  write_config_json(get_preset("tiny"), str(path / "config.json"))
  for step in (2, 4, 6, 8):
    for f in (path / "checkpoints" / str(step) / "params").rglob("*"):
      if f.is_file() and f.parent.name == "d":
        f.write_bytes(b"\0" * 16)
  with pytest.raises(UserError, match=r"checkpoints/2/params: cannot restore checkpoint \("):
    load_checkpoint(path)
  assert capsys.readouterr().err.count("using the one before") == 3
  with pytest.raises(UserError, match="no params/ checkpoint found"):
    load_checkpoint(path / "checkpoints" / "9")
