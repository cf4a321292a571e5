"""BERT-Large as in the paper: the same schedule and optimiser as Base, 24 layers x 1024."""

import pathlib
import runpy

common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))


def get_config(arg=None):
  del arg
  c = common["base_config"]()
  c.model.preset = "large"
  # model.remat stays auto: 16 GB TPU chips recompute each layer where a phase would not fit
  # otherwise, 80 GB GPUs hold the paper's batches without it (about 30% less step time by
  # tools/gpu_roofline.py, README "Pretrain on GPUs").
  return c
