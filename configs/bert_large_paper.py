"""BERT-Large as in the paper: the same schedule and optimiser as Base, 24 layers x 1024."""

import pathlib
import runpy

common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))


def get_config(arg=None):
  del arg
  c = common["base_config"]()
  c.model.preset = "large"
  c.model.remat = True  # 24 layers at length 512: trade compute for activation memory
  return c
