"""Shared defaults for the pretraining configs (the schedule is data: README "Configs and presets").

Config files are loaded by path, not imported as a package, so each config pulls this file in
with `runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))`, which works from any
working directory.
"""

from __future__ import annotations

import ml_collections


def phase(fraction: float, seq_len: int, max_predictions: int, batch_size: int, *,
          grad_accum: int = 1, data: str = "", warmup_steps: int = -1,
          learning_rate: float = -1.0) -> dict:
  """One phase of the schedule; -1 for warmup_steps/learning_rate inherits config.optim's."""
  return dict(fraction=fraction, seq_len=seq_len, max_predictions=max_predictions,
              batch_size=batch_size, grad_accum=grad_accum, data=data,
              warmup_steps=warmup_steps, learning_rate=learning_rate)


def base_config() -> ml_collections.ConfigDict:
  """The paper's recipe for BERT-Base (Devlin et al. 2018, appendix A.2)."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.preset = "base"
  c.model.overrides = ml_collections.ConfigDict()  # BertConfig fields, e.g. vocab_size
  c.model.dtype = "auto"       # compute dtype (params stay float32); auto: bfloat16 where the
                               # chips have bfloat16 matrix units (TPU, Ampere+, AMX), else float32
  c.model.attention = "auto"   # fused kernel where the platform has one (modeling/attention.py)
  # Recompute activations in the backward pass: True (each layer whole), "dots" (all but the
  # weight matmuls' outputs), False, or auto (per phase: the least of these that fits the chips;
  # training/remat.py). A bool or a word.
  c.model.remat = ml_collections.FieldReference("auto", field_type=object)

  c.objective = "mlm_nsp"      # "mlm_nsp": the paper's MLM + NSP on sentence pairs | "mlm":
                               # MLM only on packed rows (data: create-data --objective mlm)
  c.init_from = ""             # "" (random) | HF BERT dir | bert-jax checkpoint/workdir
  c.seed = 0

  # 1M steps of 256 sequences: 90% at length 128 (20 predictions), 10% at 512 (80).
  c.total_steps = 1_000_000
  c.phases = [phase(0.9, 128, 20, 256), phase(0.1, 512, 80, 256)]

  c.data = ml_collections.ConfigDict()
  c.data.input = []            # corpus files / "sample:en" for vocab and data creation
  c.data.text_field = ""       # the text's field in JSON lines inputs (and tfds; "": text)
  c.data.vocab = ""            # "" = train workdir/vocab.txt from data.input
  c.data.vocab_required = False  # True: refuse to train a vocab (e.g. Chinese: use Google's)
  c.data.vocab_size = 30522
  c.data.lower_case = True
  c.data.dupe_factor = 5
  c.data.masked_lm_prob = 0.15
  c.data.short_seq_prob = 0.1
  c.data.whole_word_mask = False
  c.data.doc_sentences = False   # objective mlm: rows within documents (RoBERTa's DOC-SENTENCES)
  c.data.eval_fraction = 0.01
  c.data.dynamic_masking = False
  c.data.worker_count = -1       # grain worker processes building batches; -1: from the cores
                                 # (pipeline.default_worker_count: 0 below 8 cores)
  c.data.prefetch = 2            # batches built and copied to the devices ahead of the step
  c.data.allow_replaced_bytes = False  # True: go on when >1% of a file's bytes are not UTF-8

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.learning_rate = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.01        # not on LayerNorm parameters nor on biases
  c.optim.bias_correction = False    # BERT's AdamWeightDecay has none
  c.optim.clip_norm = 1.0
  c.optim.warmup_steps = 10_000
  c.optim.schedule = "continuous"    # over the global step, as the paper | "per_phase"
  # "zero": polynomial decay from step 0 over all steps, warmup overriding the first steps
  # (google-research/bert's optimization.py) | "warmup_end": decay from the peak at warmup's end
  c.optim.decay_from = "zero"
  c.optim.decay_power = 1.0          # 1.0 = linear decay
  c.optim.end_learning_rate = 0.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 10_000
  c.checkpoint.keep_last = 3
  c.checkpoint.keep_every = 100_000
  c.checkpoint.async_save = True

  c.log_every = 100
  c.eval_every = 10_000
  c.eval_batches = 20
  c.nan_policy = "skip"              # "skip" the update | "stop" the run
  return c
