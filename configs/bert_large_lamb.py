"""BERT-Large with LAMB, NVIDIA's large-batch recipe (DeepLearningExamples, after You et al. 2019).

Phase 1: 7038 steps of 65536 sequences at length 128, lr 6e-3, warmup_proportion 0.2843.
Phase 2: 1563 steps of 32768 sequences at length 512, lr 4e-3, warmup_proportion 0.128.
Each phase re-warms and decays (polynomial, power 0.5) on its own. The batches are reached by
gradient accumulation: grad_accum micro-batches per step (512 and 128 sequences per micro-batch
over the whole mesh); raise or lower it to fit device memory, the update is the same.
"""

import pathlib
import runpy

common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))
phase = common["phase"]

PHASE1_STEPS = 7038
PHASE2_STEPS = 1563


def get_config(arg=None):
  del arg
  c = common["base_config"]()
  c.model.preset = "large"
  total = PHASE1_STEPS + PHASE2_STEPS
  c.total_steps = total
  c.phases = [
      phase(PHASE1_STEPS / total, 128, 20, 65536, grad_accum=128,
            warmup_steps=round(0.2843 * PHASE1_STEPS), learning_rate=6e-3),   # 2001
      phase(PHASE2_STEPS / total, 512, 80, 32768, grad_accum=256,
            warmup_steps=round(0.128 * PHASE2_STEPS), learning_rate=4e-3)]    # 200
  c.optim.name = "lamb"
  c.optim.learning_rate = 6e-3
  c.optim.warmup_steps = round(0.2843 * PHASE1_STEPS)
  c.optim.bias_correction = True
  c.optim.weight_decay = 0.01
  c.optim.schedule = "per_phase"
  c.optim.decay_power = 0.5
  c.checkpoint.every_steps = 200
  c.checkpoint.keep_every = 1000
  c.eval_every = 500
  c.seed = 12439
  return c
