"""BERT-Large as in the paper: the same schedule and optimiser as Base, 24 layers x 1024."""

import pathlib
import runpy

common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))


def get_config(arg=None):
  del arg
  c = common["base_config"]()
  c.model.preset = "large"
  # model.remat stays auto: a v5e-16 keeps phase 1's activations and recomputes all but the
  # matmuls in phase 2 (remat dots), 80 GB GPUs hold the paper's batches without recomputing
  # (README, "Plan a pod" and "Pretrain on GPUs").
  return c
