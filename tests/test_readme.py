"""The README's commands, as a user copies them: each `bert-jax`, `bert-jax-convert` and
`python -m bert_jax.finetune` line of its bash blocks parses with the command's own parser, a
pretrain line's config and overrides resolve, a fine-tuning line's output paths pass the
checks made before anything loads, and each launcher line runs with --dry-run."""

from __future__ import annotations

import pathlib
import re
import shlex
import subprocess

import pytest

from bert_jax import convert, vocab
from bert_jax.data import create
from bert_jax.finetune import __main__ as finetune_main
from bert_jax.finetune import outputs, predict
from bert_jax.pretraining import plan, run_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PARSERS = {"train-vocab": vocab.build_parser, "create-data": create.build_parser,
           "plan": plan.build_parser}


def readme_commands(programs=("bert-jax", "bert-jax-convert", "python -m bert_jax.finetune")
                    ) -> list[list[str]]:
  """argv of every command of `programs` in the README's bash blocks: continuation lines joined,
  `&&` chains split, comments dropped, and NAME="..." assignments of the block expanded."""
  text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    names = {}
    for line in block.replace("\\\n", " ").splitlines():
      for part in line.split("&&"):
        words = shlex.split(part, comments=True)
        if len(words) == 1 and re.fullmatch(r"\w+=[^$]*", words[0]):
          name, value = words[0].split("=", 1)
          names[name] = shlex.split(value)
          continue
        argv = [w for word in words
                for w in (names[word[1:]] if word[1:] in names and word[0] == "$" else [word])]
        if any(argv[:len(p.split())] == p.split() for p in programs):
          commands.append(argv)
  return commands


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_users_take():
  kinds = {" ".join(argv[:2]) if argv[0] == "bert-jax" else argv[0] if argv[0] != "python"
           else "finetune " + ("predict" if argv[3] == "predict" else "train")
           for argv in COMMANDS}
  assert {"bert-jax train-vocab", "bert-jax create-data", "bert-jax pretrain", "bert-jax plan",
          "bert-jax-convert", "finetune train", "finetune predict"} <= kinds


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a[:4]) for a in COMMANDS])
def test_readme_command_parses(argv, tmp_path, monkeypatch):
  if argv[0] == "bert-jax-convert":
    convert.build_parser().parse_args(argv[1:])
  elif argv[0] == "python" and argv[3] == "predict":
    predict.build_parser().parse_args(argv[4:])
  elif argv[0] == "python":
    args = finetune_main.build_parser().parse_args(argv[3:])
    if args.export_hf:  # checked in an empty directory, as on a user's first run
      monkeypatch.chdir(tmp_path)
      outputs.check_export_hf(args.export_hf, args.output_dir)
  elif argv[1] == "pretrain":
    monkeypatch.chdir(REPO_ROOT)
    spec, _, overrides = run_config.parse_args(argv[2:])
    run_config.resolve_config(spec, overrides)
  else:
    PARSERS[argv[1]]().parse_known_args(argv[2:])  # plan's rest: --config overrides


LAUNCHES = readme_commands(("launch/tpu_pretrain.sh", "launch/gpu_pretrain.sh"))


@pytest.mark.parametrize("argv", LAUNCHES, ids=[a[0] for a in LAUNCHES])
def test_readme_launcher_runs_dry(argv, tmp_path):
  """Run as shown, plus --dry-run, with a `gcloud` that finds the TPU VM ready."""
  (tmp_path / "gcloud").write_text("#!/usr/bin/env bash\n"
                                   '[[ " $* " == *" describe "* ]] && echo READY\nexit 0\n')
  (tmp_path / "gcloud").chmod(0o755)
  env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path)}
  split = argv.index("--") if "--" in argv else len(argv)
  proc = subprocess.run([*argv[:split], "--dry-run", *argv[split:]], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert "bert-jax pretrain" in proc.stdout
