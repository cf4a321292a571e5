"""BERT-Base, the paper's schedule with attention dropout 0: the fast recipe, whose attention is
fused on GPUs (cuDNN) and TPUs (splash) in training too. ModernBERT, MosaicBERT and Cramming
train without attention dropout; the paper's exact recipe (0.1) is configs/bert_base_paper.py,
whose attention trains through this project's Pallas kernel, dropout inside (it spends time
hashing the dropout bits that these kernels do not; the run's log says which path it takes).

  bert-jax pretrain --config configs/bert_base_fast.py --workdir DIR --config.data.input=...
"""

import pathlib
import runpy

common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))


def get_config(arg=None):
  del arg
  c = common["base_config"]()
  c.model.overrides.attention_probs_dropout_prob = 0.0
  return c
