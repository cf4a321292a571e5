"""A tiny BERT (2 layers x 128) that runs the whole two-phase schedule on a laptop CPU.

  bert-jax pretrain --config configs/tiny_cpu.py --workdir /tmp/tiny        # English sample
  bert-jax pretrain --config configs/tiny_cpu.py:zh --workdir /tmp/tiny_zh  # Chinese sample

With no other flag it trains a small WordPiece vocab and creates both phases' data (length 128,
then 512) from the corpus embedded in the package, inside the workdir, then pretrains.
Point it at your own text with --config.data.input='["my_corpus.txt"]'.
"""

import pathlib
import runpy

common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))
phase = common["phase"]


def get_config(arg=None):
  lang = arg or "en"
  if lang not in ("en", "zh"):
    raise ValueError(f"tiny_cpu.py:{lang}: expected 'en' or 'zh'")
  c = common["base_config"]()
  c.model.preset = "tiny"      # L-2_H-128
  c.model.dtype = "float32"    # CPUs have no fast bfloat16 matmuls
  c.total_steps = 800
  # Phase 2 at length 512 costs ~4x per sequence: keep its batch small.
  c.phases = [phase(0.9, 128, 20, 32), phase(0.1, 512, 80, 8)]
  c.data.input = [f"sample:{lang}"]
  c.data.vocab_size = 1000   # small: a tiny corpus, and a small softmax
  c.data.dupe_factor = 5
  c.data.eval_fraction = 0.05
  c.data.whole_word_mask = lang == "zh"
  # A small corpus seen many times: fresh masks every epoch rather than dupe_factor fixed ones.
  c.data.dynamic_masking = True
  # A tiny model on little data learns faster with a larger step and bias-corrected moments;
  # measured on the sample: lr 2e-3 leaves the most-frequent-token plateau within ~200 steps,
  # 1e-3 and 5e-3 (and BERT's raw-moment Adam) can sit on it for the whole run.
  c.optim.learning_rate = 2e-3
  c.optim.bias_correction = True
  c.optim.warmup_steps = 50
  c.checkpoint.every_steps = 200
  c.checkpoint.keep_every = 0
  c.log_every = 25
  c.eval_every = 200
  c.eval_batches = 4
  return c
