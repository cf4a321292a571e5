"""`bert-jax pretrain` end to end on CPU: bit-exact resume after SIGKILL and SIGTERM, damaged
checkpoints, the NaN policies, learning through both phases, and export to transformers."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bert_jax.pretraining import train
from bert_jax.pretraining.run_config import resolve_config
from bert_jax.pretraining.workdir import prepare_vocab

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.py")
TOTAL = 16

# Runs `bert-jax pretrain` with an optional pause after every step (BERT_JAX_TEST_STEP_DELAY),
# so a test can kill it at a chosen point; the computation itself is untouched.
RUNNER = """
import os, sys, time
import bert_jax.training.steps as steps
delay = float(os.environ.get("BERT_JAX_TEST_STEP_DELAY", "0"))
make = steps.jit_train_step
def slow(*a, **k):
  fn = make(*a, **k)
  def call(*args):
    out = fn(*args)
    time.sleep(delay)
    return out
  call.lower = fn.lower  # model.remat auto compiles the step ahead of time
  return call
steps.jit_train_step = slow
from bert_jax.pretraining.train import main
sys.exit(main(sys.argv[1:]))
"""


def run_args(prepared, workdir, *extra):
  vocab, (d32, d64) = prepared
  return ["--config", TINY, "--workdir", str(workdir), f"--config.total_steps={TOTAL}",
          f"--config.data.vocab={vocab}",
          "--config.phases.0.seq_len=32", "--config.phases.0.max_predictions=5",
          "--config.phases.0.batch_size=8", f"--config.phases.0.data={d32}",
          "--config.phases.1.seq_len=64", "--config.phases.1.max_predictions=10",
          "--config.phases.1.batch_size=4", f"--config.phases.1.data={d64}",
          "--config.checkpoint.every_steps=4", "--config.checkpoint.keep_last=10",
          "--config.log_every=1", "--config.eval_every=8",
          "--config.eval_batches=2", "--config.optim.warmup_steps=4",
          "--config.data.dynamic_masking=False", *extra]


# The runs share the suite's compilation cache (conftest.py: the same tiny programs, compiled
# once); a loaded executable is the compiled one, so bit-exact comparisons still hold.
def start(args, delay=0.0):
  env = dict(os.environ, BERT_JAX_TEST_STEP_DELAY=str(delay))
  return subprocess.Popen([sys.executable, "-c", RUNNER, *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=240):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def rows(workdir, split="train"):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if row["split"] == split:
      out.append(row)
  return out


def wait_for(proc, condition, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended before the kill point:\n{proc.stdout.read()}")
    time.sleep(0.05)
  raise AssertionError("timed out waiting for the kill point")


def final_params(workdir, step=TOTAL):
  import jax
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as c:
    params = c.restore(pathlib.Path(workdir) / "checkpoints" / str(step) / "params")
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}


def assert_bit_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def completed_run(args, workdir):
  """(workdir, output) of a run of `args` that must end with exit 0."""
  code, out = finish(start(args))
  assert code == 0, out
  return workdir, out


def kill_past_step_10_and_rerun(args, workdir):
  """SIGKILLs a run of `args` once checkpoint 8 exists and step 10 is logged, reruns it to the
  end; -> (killed process, last step it logged, the rerun's output)."""
  proc = start(args, delay=0.4)
  wait_for(proc, lambda: (workdir / "checkpoints" / "8").is_dir()
           and any(r["step"] >= 10 for r in rows(workdir)))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(r["step"] for r in rows(workdir))
  assert killed_at < TOTAL
  return proc, killed_at, completed_run(args, workdir)[1]


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  return completed_run(run_args(prepared, workdir), workdir)


def test_uninterrupted_run_layout_and_metrics(reference):
  workdir, out = reference
  assert "done: step 16" in out
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps == [4, 8, 12, 14, 16]   # every 4 steps, the phase boundary (0.9 x 16), the end
  assert (workdir / "config.json").is_file() and (workdir / "vocab.txt").is_file()
  assert json.loads((workdir / "config.pretrain.json").read_text())["total_steps"] == TOTAL
  train_rows = rows(workdir)
  assert [r["step"] for r in train_rows] == list(range(1, TOTAL + 1))
  assert {(r["phase"], r["seq_len"], tuple(r["batch_shape"])) for r in train_rows} == {
      (0, 32, (8, 32)), (1, 64, (4, 64))}
  for r in train_rows:
    for key in ("loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy",
                "learning_rate", "grad_norm"):
      assert np.isfinite(r[key]), (key, r)
  assert all(r["sequences_per_sec"] > 0 and r["tokens_per_sec"] == pytest.approx(
      r["sequences_per_sec"] * r["seq_len"]) for r in train_rows if "sequences_per_sec" in r)
  assert any("mfu" in r for r in train_rows)
  for r in train_rows:    # host time waiting for data, within the loop's time outside the step
    assert 0 <= r["data_wait_s"] <= r["host_overhead_s"], r
  evals = rows(workdir, "eval")
  assert [(r["step"], r["phase"], r["seq_len"]) for r in evals] == [
      (8, 0, 32), (14, 0, 32), (16, 1, 64)]
  assert list((workdir / "tensorboard").iterdir())


def test_mlm_perplexity_is_exp_of_the_mlm_loss(reference):
  """In every eval row (and train row) of a real run, and on the progress lines."""
  workdir, out = reference
  evals = rows(workdir, "eval")
  assert evals and all(r["mlm_perplexity"] == pytest.approx(math.exp(r["mlm_loss"]), rel=1e-9)
                       for r in evals + rows(workdir))
  assert "[eval] step 8" in out and "mlm_ppl " in out.split("[eval] step 8")[1].splitlines()[0]


@pytest.mark.slow  # one or two more `bert-jax pretrain` processes
def test_workers_and_prefetch_do_not_change_the_batches(prepared, reference, tmp_path):
  """A grain worker process and no prefetch thread: the same batches, so the same parameters."""
  code, out = finish(start(run_args(prepared, tmp_path, "--config.data.worker_count=1",
                                    "--config.data.prefetch=0")))
  assert code == 0, out
  assert_bit_equal(final_params(tmp_path), final_params(reference[0]))
  train_rows = rows(tmp_path)
  assert [r["step"] for r in train_rows] == list(range(1, TOTAL + 1))
  assert all("data_wait_s" in r and "host_overhead_s" in r for r in train_rows)


@pytest.mark.slow  # one or two more `bert-jax pretrain` processes
def test_sigkill_then_rerun_is_bit_exact(prepared, reference, tmp_path):
  workdir = tmp_path / "killed"
  proc, killed_at, out = kill_past_step_10_and_rerun(run_args(prepared, workdir), workdir)
  # The killed run's lock is recognised as stale and taken over, with a one-line warning.
  assert f"warning: {workdir}: taking over the lock of pid {proc.pid}" in out
  assert not (workdir / ".bert-jax.lock").exists()   # released at the end
  resumed = int(out.split("resuming at step ")[1].split()[0])
  assert 8 <= resumed < killed_at   # work after the last checkpoint was lost and redone
  assert_bit_equal(final_params(workdir), final_params(reference[0]))
  assert [r["step"] for r in rows(workdir)] == list(range(1, TOTAL + 1))  # no duplicate rows


@pytest.mark.slow  # one or two more `bert-jax pretrain` processes
def test_sigterm_saves_exits_zero_and_resumes_bit_exact(prepared, reference, tmp_path):
  workdir = tmp_path / "preempted"
  proc = start(run_args(prepared, workdir), delay=0.4)
  wait_for(proc, lambda: any(r["step"] >= 5 for r in rows(workdir)))
  proc.send_signal(signal.SIGTERM)
  code, out = finish(proc)
  assert code == 0, out
  assert "preempted: saved checkpoint at step" in out
  stopped = int(out.split("preempted: saved checkpoint at step ")[1].split()[0])
  assert 5 <= stopped < TOTAL
  assert (workdir / "checkpoints" / str(stopped)).is_dir()
  code, out = finish(start(run_args(prepared, workdir)))
  assert code == 0, out
  assert f"resuming at step {stopped}" in out
  assert_bit_equal(final_params(workdir), final_params(reference[0]))
  # The first row after the resume says that it averages only the steps since then.
  first = next(r for r in rows(workdir) if r["step"] > stopped)
  assert (first["resumed_at_step"], first["averaged_steps"]) == (stopped, first["step"] - stopped)
  assert all("resumed_at_step" not in r for r in rows(workdir) if r["step"] != first["step"])


@pytest.mark.slow  # one or two more `bert-jax pretrain` processes
def test_damaged_newest_checkpoint_falls_back_and_rerun_is_bit_exact(prepared, reference,
                                                                     tmp_path):
  workdir = tmp_path / "damaged"
  shutil.copytree(reference[0], workdir)
  final = workdir / "checkpoints" / str(TOTAL)
  for f in (final / "params").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"\0" * 8)
  shutil.rmtree(workdir / "checkpoints" / "14" / "meta")   # the one before is partial too
  code, out = finish(start(run_args(prepared, workdir)))
  assert code == 0, out
  assert "checkpoints/16 is incomplete or corrupt" in out
  assert "checkpoints/14 is incomplete or corrupt" in out
  assert "resuming at step 12" in out
  assert_bit_equal(final_params(workdir), final_params(reference[0]))


@pytest.mark.slow  # one or two more `bert-jax pretrain` processes
def test_checkpoint_of_the_own_data_handler_resumes_bit_exact(prepared, reference, tmp_path):
  """A step saved before grain's handler wrote the data item (bert-jax's own handler, named in
  the step's metadata, wrapped the state as {"kind": "json", "value": state} under the same
  file names) resumes bit for bit: it is mid-phase, so its iterator state decides the batches."""
  workdir = tmp_path / "old_layout"
  shutil.copytree(reference[0], workdir)
  for later in (14, TOTAL):
    shutil.rmtree(workdir / "checkpoints" / str(later))
  step = workdir / "checkpoints" / "12"
  files = list((step / "data").glob("process_*-of-*.json"))
  assert [f.name for f in files] == ["process_0-of-1.json"]
  state = json.loads(files[0].read_text())
  assert state["next_record"] == 12 * 8
  files[0].write_text(json.dumps({"kind": "json", "value": state}))
  meta = json.loads((step / "_CHECKPOINT_METADATA").read_text())
  meta["item_handlers"]["data"] = "bert_jax.storage.checkpoint.DataStateHandler"
  (step / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
  code, out = finish(start(run_args(prepared, workdir)))
  assert code == 0, out
  assert "resuming at step 12" in out and "incomplete or corrupt" not in out
  assert_bit_equal(final_params(workdir), final_params(reference[0]))


@pytest.mark.slow  # one or two more `bert-jax pretrain` processes
def test_two_runs_on_one_workdir_the_second_refuses(prepared, tmp_path):
  """The second used to run too, and its metrics.jsonl rewrite lost the first's rows."""
  import socket
  workdir = tmp_path / "shared"
  first = start(run_args(prepared, workdir), delay=0.3)
  wait_for(first, lambda: bool(rows(workdir)))
  code, out = finish(start(run_args(prepared, workdir)), timeout=120)
  assert code == 2, out
  assert out.strip().splitlines()[-1] == (
      f"error: --workdir {workdir}: in use by pid {first.pid} on host {socket.gethostname()} "
      f"(started {json.loads((workdir / '.bert-jax.lock').read_text())['started']}); wait for "
      f"it, use another directory, or delete {workdir / '.bert-jax.lock'} if that run is no "
      "longer running")
  code, out = finish(first)
  assert code == 0, out
  assert [r["step"] for r in rows(workdir)] == list(range(1, TOTAL + 1))   # nothing lost


def _permuted_vocab(vocab, path):
  """The same tokens (and size) in another order: another vocab that nothing else catches."""
  lines = pathlib.Path(vocab).read_text(encoding="utf-8").splitlines()
  path.write_text("\n".join(lines[:5] + lines[5:][::-1]) + "\n", encoding="utf-8")
  return str(path)


def test_data_made_with_another_vocab_is_refused(prepared, tmp_path, capsys):
  other = _permuted_vocab(prepared[0], tmp_path / "other_vocab.txt")
  workdir = tmp_path / "w"
  code = train.main(run_args(prepared, workdir) + [f"--config.data.vocab={other}"])
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {prepared[1][0]}: made with another vocab ({prepared[0]}, "
                        "sha256 ") and f"than this run's {workdir / 'vocab.txt'}" in err
  assert "\n" not in err and not rows(workdir)


def test_failed_setup_leaves_nothing_that_blocks_the_corrected_rerun(prepared, tmp_path, capsys):
  """A vocab larger than the model used to leave vocab.txt and config.pretrain.json behind, and
  the rerun with the corrected vocab was refused ("differs ... use a new --workdir")."""
  workdir = tmp_path / "w"
  code = train.main(run_args(prepared, workdir) + ["--config.model.overrides.vocab_size=500"])
  assert code == 2
  assert "vocab_size=500 is smaller than" in capsys.readouterr().err
  assert not (workdir / "vocab.txt").exists() and not (workdir / "config.pretrain.json").exists()
  cfg = resolve_config(TINY, [("data.vocab", _permuted_vocab(
      prepared[0], tmp_path / "corrected_vocab.txt"))])
  assert prepare_vocab(cfg, str(workdir), is_writer=True) == str(workdir / "vocab.txt")


def test_a_wrong_attention_kernel_stops_the_run_before_any_state(prepared, tmp_path, capsys,
                                                                 monkeypatch):
  """On a GPU or TPU the run first checks the compiled Pallas kernel (kernel_check): here the
  check is run on this CPU's interpreted kernel, made to draw other dropout bits."""
  from bert_jax.modeling import kernel_check
  from test_kernel_check import flip_the_kernels_bits
  cases = kernel_check.kernel_cases
  monkeypatch.setattr(kernel_check, "kernel_cases",
                      lambda mc, platform, *a: cases(mc.replace(attention="pallas"), "gpu", *a))
  flip_the_kernels_bits(monkeypatch)
  workdir = tmp_path / "w"
  assert train.main(run_args(prepared, workdir)) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: attention: the Pallas kernel compiled for this cpu") and \
      "at length 32, dropout 0.1" in err and "--config.model.attention=xla" in err
  assert "\n" not in err and not rows(workdir) and not (workdir / "checkpoints").exists()


def test_corrupt_or_truncated_phase_2_shard_is_one_line_before_training(prepared, tmp_path,
                                                                        capsys):
  vocab, (d32, d64) = prepared
  for damage in ("corrupt", "truncate"):
    data = tmp_path / f"{damage}64"
    shutil.copytree(d64, data)
    shard = next(data.glob("train-*.array_record"))
    blob = bytearray(shard.read_bytes())
    if damage == "corrupt":
      blob[len(blob) // 3:len(blob) // 3 + 4096] = bytes(4096)
    else:
      blob = blob[:len(blob) // 2]
    shard.write_bytes(bytes(blob))
    workdir = tmp_path / f"w_{damage}"
    code = train.main([a if not a.startswith("--config.phases.1.data=") else
                       f"--config.phases.1.data={data}" for a in run_args(prepared, workdir)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --config.phases.1.data={data}: ") and "\n" not in err, err
    assert f"shard {shard} cannot be read" in err or (
        "shards hold" in err and "damaged or truncated" in err), err
    assert "recreate the data with bert-jax create-data" in err
    assert not rows(workdir)   # refused at set-up, not when phase 2 begins


def _file_bytes(root):
  return {str(f.relative_to(root)): f.read_bytes() for f in pathlib.Path(root).rglob("*")
          if f.is_file()}


def test_resume_with_another_model_is_refused_and_checkpoints_stay_byte_identical(
    prepared, reference, tmp_path, capsys):
  """It used to warn "config differs (changed: model); continuing", call every good
  checkpoint "incomplete or corrupt", rename it N.corrupt-*, and restart at step 0."""
  workdir = tmp_path / "w"
  shutil.copytree(reference[0], workdir)
  shutil.rmtree(workdir / "checkpoints" / str(TOTAL))   # mid-run: there is work to resume
  before = _file_bytes(workdir)
  code = train.main(run_args(prepared, workdir, "--config.model.preset=mini"))
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: --workdir {workdir}: its checkpoints were written for another "
                        "model (changed: hidden_size 128 -> 256, num_hidden_layers 2 -> 4") and \
      "\n" not in err, err
  assert _file_bytes(workdir) == before   # nothing renamed, no config rewritten


def test_full_disk_at_a_checkpoint_stops_there_with_one_line(prepared, tmp_path, monkeypatch,
                                                            capsys):
  from test_checkpoint import _disk_full_from_save
  _disk_full_from_save(monkeypatch, after=1)   # step 4 saves, step 8 finds the disk full
  code = train.main(run_args(prepared, tmp_path))
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
      f"error: {tmp_path / 'checkpoints' / '8'}: no space left on device ("), err
  assert "the last complete one is step 4" in err[0]
  assert max(r["step"] for r in rows(tmp_path)) == 8   # no step after the failed save
  assert sorted(d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == ["4"]


def test_phase_longer_or_batch_larger_than_its_data_is_refused_at_set_up(prepared, tmp_path,
                                                                        capsys):
  """A seq-64 phase given seq-32 data used to train, its positions 32-63 never seen."""
  d32 = prepared[1][0]
  code = train.main(run_args(prepared, tmp_path, f"--config.phases.1.data={d32}"))
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert err == (f"error: --config.phases.1.data={d32}: instances were created with "
                 "--max-seq-length 32, shorter than this phase's seq_len 64 (positions 32-63 "
                 "would never be trained); run create-data with --max-seq-length 64"), err
  assert not rows(tmp_path)
  train_instances = json.loads((pathlib.Path(d32) / "manifest.json").read_text())[
      "splits"]["train"]["num_instances"]
  code = train.main(run_args(prepared, tmp_path, f"--config.phases.0.batch_size={10 ** 6}"))
  assert code == 2
  assert capsys.readouterr().err.strip() == (
      f"error: --config.phases.0.batch_size=1000000: larger than the {train_instances} training "
      f"instances of {d32}; expected at most {train_instances} (or more data: a larger corpus "
      "or --dupe-factor)")


def test_rerun_of_finished_workdir_is_a_no_op(prepared, reference, capsys):
  workdir = reference[0]
  before = sorted(os.listdir(workdir / "checkpoints"))
  assert train.main(run_args(prepared, workdir)) == 0
  assert "already complete: step 16" in capsys.readouterr().out
  assert sorted(os.listdir(workdir / "checkpoints")) == before


def _phase_2_runs_out_of_memory_without_remat(monkeypatch, take_state: bool):
  """The step without remat fails on phase 2's batches (length 64) as XLA fails a step larger
  than the device, after deleting the donated state if `take_state`; it compiles as usual."""
  import jax

  from bert_jax.training import steps
  real = steps.Pretraining._step

  class Failing:
    def __init__(self, step):
      self.step, self.lower = step, step.lower

    def __call__(self, state, batch, rng):
      if batch["input_ids"].shape[1] != 64:
        return self.step(state, batch, rng)
      if take_state:
        jax.tree.map(lambda x: x.delete(), state)
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.21GiB.")

  monkeypatch.setattr(steps.Pretraining, "_step",
                      lambda self, accum, remat: real(self, accum, remat) if remat
                      else Failing(real(self, accum, remat)))


def _at_the_phase_boundary(reference, tmp_path):
  """A copy of the reference run stopped at step 14, where phase 2 begins."""
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  shutil.rmtree(workdir / "checkpoints" / str(TOTAL))
  return workdir


def _assert_params_as_reference(workdir, reference):
  expected = final_params(reference[0])  # remat recomputes the same numbers
  for key, value in final_params(workdir).items():
    np.testing.assert_allclose(value, expected[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_a_step_out_of_memory_without_remat_reruns_its_batch_with_remat(
    prepared, reference, tmp_path, monkeypatch, capsys):
  """model.remat auto left remat off (the step fitted on paper) but the step ran out of memory:
  the phase recomputes all but the matmuls from then on ("dots"), the same batch runs again, no
  step is lost, and remat.json keeps later starts from trying again."""
  workdir = _at_the_phase_boundary(reference, tmp_path)
  _phase_2_runs_out_of_memory_without_remat(monkeypatch, take_state=False)
  assert train.main(run_args(prepared, workdir)) == 0
  out = capsys.readouterr().out
  assert "phase 2: ran out of device memory with remat off (RuntimeError: RESOURCE_EXHAUSTED" in out
  assert "; remat dots from now on (remat.json)" in out
  assert json.loads((workdir / "remat.json").read_text()) == {"phases": {"1": "dots"}}
  assert [r["step"] for r in rows(workdir)] == list(range(1, TOTAL + 1))
  _assert_params_as_reference(workdir, reference)


def test_a_step_out_of_memory_that_took_the_state_stops_and_the_rerun_recomputes(
    prepared, reference, tmp_path, monkeypatch, capsys):
  workdir = _at_the_phase_boundary(reference, tmp_path)
  _phase_2_runs_out_of_memory_without_remat(monkeypatch, take_state=True)
  assert train.main(run_args(prepared, workdir)) == train.EXIT_OUT_OF_MEMORY
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == (f"error: phase 2's step ran out of device memory and took the train state "
                     f"with it; {workdir}/remat.json now gives the phase remat dots: rerun the "
                     "same command to resume from step 14")
  monkeypatch.undo()
  assert train.main(run_args(prepared, workdir)) == 0
  out = capsys.readouterr().out
  assert "phase 2: remat dots: ran out of memory without remat, " in out
  assert [r["step"] for r in rows(workdir)] == list(range(1, TOTAL + 1))
  _assert_params_as_reference(workdir, reference)


def _poison_batch_at(monkeypatch, call_index):
  """masked_lm_weights become NaN in the `call_index`-th batch (1-based): a non-finite loss."""
  import bert_jax.training.sharding as sharding
  real = sharding.global_batch
  calls = {"n": 0}

  def poisoned(host_batch, mesh):
    calls["n"] += 1
    if calls["n"] == call_index:
      host_batch = dict(host_batch)
      host_batch["masked_lm_weights"] = np.full_like(host_batch["masked_lm_weights"], np.nan)
    return real(host_batch, mesh)

  monkeypatch.setattr(sharding, "global_batch", poisoned)


def test_nan_policy_stop_keeps_last_good_checkpoint(prepared, reference, tmp_path, monkeypatch,
                                                    capsys):
  _poison_batch_at(monkeypatch, 7)   # the update to step 7
  code = train.main(run_args(prepared, tmp_path, "--config.nan_policy=stop"))
  assert code == train.EXIT_NONFINITE
  assert "non-finite loss or gradient at step 7" in capsys.readouterr().err
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [4]
  # the step-4 checkpoint is the good one: identical to the uninterrupted run's
  assert_bit_equal(final_params(tmp_path, 4), final_params(reference[0], 4))


def test_nan_policy_skip_skips_and_counts(prepared, tmp_path, monkeypatch):
  _poison_batch_at(monkeypatch, 7)
  assert train.main(run_args(prepared, tmp_path)) == 0
  train_rows = rows(tmp_path)
  assert [r["skipped_steps"] for r in train_rows] == [1 if r["step"] == 7 else 0
                                                     for r in train_rows]
  assert train_rows[-1]["skipped_total"] == 1
  assert all(np.isfinite(v).all() for v in final_params(tmp_path).values())


def test_init_from_vocab_mismatch_is_a_user_error(prepared, minilm_dir, tmp_path, capsys):
  code = train.main(run_args(prepared, tmp_path, f"--config.init_from={minilm_dir}"))
  assert code == 2
  err = capsys.readouterr().err
  assert "init_from" in err and "vocab_size is 30522" in err


def test_resumed_run_does_not_read_init_from_weights(prepared, reference, tmp_path, capsys):
  """init_from's weights are loaded only for a fresh start: a resumed run needs its
  config.json alone, and not even that once init_from is gone."""
  init = tmp_path / "init"   # a bert-jax checkpoint whose weights are gone since
  init.mkdir()
  shutil.copy(reference[0] / "config.json", init / "config.json")
  workdir = tmp_path / "w"
  shutil.copytree(reference[0], workdir)
  for step in ("14", "16"):
    shutil.rmtree(workdir / "checkpoints" / step)
  assert train.main(run_args(prepared, workdir, f"--config.init_from={init}")) == 0
  assert "resuming at step 12" in capsys.readouterr().out
  assert_bit_equal(final_params(workdir), final_params(reference[0]))
  shutil.rmtree(init)
  assert train.main(run_args(prepared, workdir, f"--config.init_from={init}")) == 0
  assert "already complete: step 16" in capsys.readouterr().out


def test_exported_checkpoint_matches_transformers(reference, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from bert_jax import BertForPreTraining, load_pretrained
  from bert_jax.convert import main as convert_main
  workdir = reference[0]
  assert convert_main(["to-hf", str(workdir), str(tmp_path / "hf")]) == 0
  config, params = load_pretrained(str(workdir))
  np.testing.assert_array_equal(
      params["bert"]["pooler"]["dense"]["kernel"],
      final_params(workdir)["['bert']['pooler']['dense']['kernel']"])
  hf = transformers.BertForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
  rng = np.random.default_rng(0)
  ids = rng.integers(5, config.vocab_size, size=(2, 24)).astype(np.int32)
  types = np.concatenate([np.zeros((2, 12)), np.ones((2, 12))], 1).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 20:] = 0
  mlm, nsp = BertForPreTraining(config).apply({"params": params}, ids, types, mask)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids, dtype=torch.long),
             token_type_ids=torch.tensor(types, dtype=torch.long),
             attention_mask=torch.tensor(mask, dtype=torch.long))
  np.testing.assert_allclose(np.asarray(mlm)[mask == 1],
                             out.prediction_logits.numpy()[mask == 1], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(nsp), out.seq_relationship_logits.numpy(), atol=1e-4,
                             rtol=1e-4)


@pytest.mark.slow
def test_tiny_model_learns_real_text_through_both_phases(shared_data, tmp_path):
  """Vocab and both phases' data created in the workdir from WikiText; phase 2 at 512."""
  corpus = tmp_path / "wiki.txt"
  text = (shared_data / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8")
  corpus.write_text(text[:10_000], encoding="utf-8")
  workdir = tmp_path / "run"
  code = train.main([
      "--config", TINY, "--workdir", str(workdir), f"--config.data.input={corpus}",
      "--config.data.vocab_size=600", "--config.data.dupe_factor=5",
      "--config.data.eval_fraction=0", "--config.total_steps=200",
      "--config.phases.0.fraction=0.75", "--config.phases.1.fraction=0.25",
      "--config.phases.0.batch_size=32", "--config.phases.1.batch_size=4",
      "--config.optim.learning_rate=1e-3", "--config.optim.warmup_steps=10",
      # As the paper: fixed masks and BERT's raw-moment Adam (tiny_cpu's own choices, fresh masks
      # and bias correction, learn steadily but more slowly than this test measures).
      "--config.data.dynamic_masking=False", "--config.optim.bias_correction=False",
      "--config.log_every=10", "--config.eval_every=0", "--config.checkpoint.every_steps=0"])
  assert code == 0
  assert (workdir / "vocab.txt").is_file()
  assert (workdir / "data" / "phase_1" / "manifest.json").is_file()
  train_rows = rows(workdir)
  for phase, seq in ((0, 128), (1, 512)):
    phase_rows = [r for r in train_rows if r["phase"] == phase]
    assert len(phase_rows) >= 4 and all(r["seq_len"] == seq for r in phase_rows)
    assert all(r["batch_shape"][1] == seq for r in phase_rows)
    first, last = phase_rows[0], phase_rows[-1]
    assert last["mlm_loss"] < first["mlm_loss"] - 0.3, (phase, first, last)
    assert last["mlm_accuracy"] > first["mlm_accuracy"] + 0.02, (phase, first, last)
    assert last["nsp_accuracy"] > first["nsp_accuracy"], (phase, first, last)


@pytest.mark.slow
def test_init_from_hf_continues_pretraining_with_its_vocab(shared_data, minilm_dir, tmp_path):
  """--config.init_from=HF_DIR: the model's own vocab is used, training starts from its weights."""
  from bert_jax.convert import load_pretrained
  code = train.main([
      "--config", TINY, "--workdir", str(tmp_path), f"--config.init_from={minilm_dir}",
      f"--config.data.input={shared_data / 'bert' / 'sample_text.txt'}",
      "--config.data.dupe_factor=1", "--config.data.eval_fraction=0", "--config.total_steps=2",
      "--config.phases.0.seq_len=32", "--config.phases.0.max_predictions=5",
      "--config.phases.0.batch_size=2", "--config.phases.1.seq_len=64",
      "--config.phases.1.max_predictions=10", "--config.phases.1.batch_size=2",
      "--config.optim.learning_rate=1e-5", "--config.optim.warmup_steps=0",
      "--config.eval_every=0"])
  assert code == 0
  assert (tmp_path / "vocab.txt").read_bytes() == (minilm_dir / "vocab.txt").read_bytes()
  _, start = load_pretrained(str(minilm_dir), verbose=False)
  _, end = load_pretrained(str(tmp_path), verbose=False)
  for name in ("word_embeddings", "position_embeddings"):
    a = np.asarray(start["bert"]["embeddings"][name]["embedding"])
    b = np.asarray(end["bert"]["embeddings"][name]["embedding"])
    assert not np.array_equal(a, b)                  # it trained...
    np.testing.assert_allclose(b, a, atol=1e-3)      # ...from MiniLM's weights (tiny lr)
