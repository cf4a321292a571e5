"""BERT-Large as in the paper: the same schedule and optimiser as Base, 24 layers x 1024."""

import pathlib
import runpy

common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))


def get_config(arg=None):
  del arg
  c = common["base_config"]()
  c.model.preset = "large"
  # 24 layers at length 512: trade compute for activation memory (16 GB TPU chips). 80 GB GPUs
  # hold the paper's batches without it: --config.model.remat=False, about 30% less step time
  # there by tools/gpu_roofline.py (README, "Pretrain on GPUs").
  c.model.remat = True
  return c
