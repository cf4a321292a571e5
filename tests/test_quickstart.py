"""launch/quickstart.sh end to end (slow), and tools/plot_metrics.py (fast)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))

import plot_metrics  # noqa: E402  (tools/ is not a package)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The learning claim: held-out MLM accuracy of the length-128 phase at least this much above
# always predicting the most frequent token (measured: about 0.12 against 0.05).
LEARNING_MARGIN = 0.04
ACCURACY_LINE = re.compile(r"^phase (\d) \(seq (\d+), step \d+\): MLM accuracy ([0-9.]+) vs "
                           r"([0-9.]+) for always predicting the most frequent token \('(.+)'\), "
                           r"on (\d+) held-out sequences$", re.MULTILINE)


def _write_metrics(path: pathlib.Path, torn_tail: bool = False) -> None:
  rows = []
  for step in range(10, 101, 10):
    phase, seq_len = (0, 128) if step <= 90 else (1, 512)
    rows.append(dict(step=step, split="train", phase=phase, seq_len=seq_len, loss=9 - step / 20,
                     mlm_loss=8 - step / 20, mlm_accuracy=step / 200, nsp_accuracy=0.5))
  rows.append(dict(step=50, split="eval", phase=0, seq_len=128, loss=6.5, mlm_loss=5.9,
                   mlm_accuracy=0.2, nsp_accuracy=0.55))
  text = "\n".join(json.dumps(r) for r in rows) + "\n"
  path.write_text(text + ('{"step": 110, "loss"' if torn_tail else ""))


def test_plot_metrics_writes_png_with_phase_boundary(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  _write_metrics(metrics, torn_tail=True)
  rows = plot_metrics.read_rows(str(metrics))
  assert len(rows) == 11  # the torn last line is skipped
  train = [r for r in rows if r["split"] == "train"]
  assert plot_metrics.phase_boundaries(train) == [(90, "phase 2 (seq 512)")]
  out = tmp_path / "plots" / "curves.png"
  assert plot_metrics.plot_metrics(str(metrics), str(out)) == str(out)
  assert out.read_bytes()[:8] == PNG_MAGIC
  import matplotlib.image
  image = matplotlib.image.imread(str(out))
  assert image.shape[0] > 300 and image.shape[1] > 600
  assert not list(out.parent.glob(".*tmp*"))  # the temporary file was renamed


def test_plot_metrics_rejects_empty_and_missing(tmp_path):
  empty = tmp_path / "metrics.jsonl"
  empty.write_text('{"note": "no step"}\n')
  with pytest.raises(ValueError, match="no metric rows"):
    plot_metrics.plot_metrics(str(empty), str(tmp_path / "x.png"))
  assert plot_metrics.main([str(empty)]) == 2
  assert plot_metrics.main([str(tmp_path / "nope.jsonl")]) == 2
  assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_quickstart_runs_the_whole_path(tmp_path):
  workdir = tmp_path / "qs"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(["bash", "launch/quickstart.sh", str(workdir)], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  check_quickstart_output(workdir, proc.stdout)


def check_quickstart_output(workdir: pathlib.Path, out: str) -> None:
  # It learned: held-out accuracy clearly above the unigram guess, said in so many words.
  claims = {int(m.group(1)): m for m in ACCURACY_LINE.finditer(out)}
  assert set(claims) == {1, 2}, out[-3000:]
  phase1 = claims[1]
  accuracy, baseline = float(phase1.group(3)), float(phase1.group(4))
  assert 0.01 < baseline < 0.2 and int(phase1.group(6)) >= 64
  assert accuracy > baseline + LEARNING_MARGIN, phase1.group(0)
  assert float(claims[2].group(3)) > float(claims[2].group(4)), claims[2].group(0)

  # Both phases trained, in order, up to the config's last step.
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r.get("split") == "train"]
  assert [r["seq_len"] for r in train] == sorted(r["seq_len"] for r in train)
  assert {r["seq_len"] for r in train} == {128, 512}
  from bert_jax.pretraining.run_config import resolve_config
  total_steps = int(resolve_config(str(REPO_ROOT / "configs" / "tiny_cpu.py"), []).total_steps)
  assert train[-1]["step"] == total_steps
  assert (workdir / "checkpoints" / str(total_steps)).is_dir()
  assert list((workdir / "tensorboard").iterdir())

  # The PNG is where the summary says.
  png = re.search(r"^ +learning curves +(\S+)$", out, re.MULTILINE).group(1)
  assert pathlib.Path(png).read_bytes()[:8] == PNG_MAGIC

  # The fill-mask answer printed by transformers is the bert-jax checkpoint's own argmax.
  lines = out.splitlines()
  sentence_at = next(i for i, line in enumerate(lines) if "[MASK]" in line
                     and not line.startswith("+"))
  sentence = lines[sentence_at]
  guesses = [line.split() for line in lines[sentence_at + 1:sentence_at + 6]]
  assert len(guesses) == 5 and all(float(g[0]) > 0 for g in guesses)
  # ...and its best guess for "poured the hot water over [MASK] tea leaves" is a word.
  assert guesses[0][1].isalpha() and guesses[0][1] not in ("unk", "UNK"), guesses

  import jax.numpy as jnp
  from transformers import BertTokenizerFast

  from bert_jax import BertForPreTraining, load_pretrained
  config, params = load_pretrained(str(workdir))
  tokenizer = BertTokenizerFast.from_pretrained(str(workdir / "hf"))
  encoded = tokenizer(sentence, return_tensors="np")
  ids = encoded["input_ids"]
  mlm_logits, _ = BertForPreTraining(config).apply(
      {"params": params}, jnp.asarray(ids), jnp.asarray(encoded["token_type_ids"]),
      jnp.asarray(encoded["attention_mask"]))
  mask_at = int(np.argmax(ids[0] == tokenizer.mask_token_id))
  best = tokenizer.convert_ids_to_tokens(int(np.argmax(mlm_logits[0, mask_at])))
  assert guesses[0][1] == best.replace("##", "") or guesses[0][1] == best
