"""BERT-Base as in the paper: batch 256, 1M steps (900k at 128 / 100k at 512), Adam 1e-4.

  bert-jax pretrain --config configs/bert_base_paper.py --workdir DIR \
      --config.data.input='["corpus1.txt", "corpus2.txt"]'      # or per-phase data dirs:
      --config.phases.0.data=DATA128 --config.phases.1.data=DATA512 --config.data.vocab=vocab.txt
"""

import pathlib
import runpy

common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))


def get_config(arg=None):
  del arg
  return common["base_config"]()
