"""Chinese BERT-Base in the "wwm-ext" style: MLM only (no NSP), one phase of full 512-token rows,
whole-word masking with jieba words.

Rows are contiguous sentences packed across documents with [SEP] between them (create-data
--objective mlm, made in the workdir from data.input); masks are drawn afresh every epoch.
The vocab is given by the user, e.g. Google's bert-base-chinese vocab.txt, and the run usually
continues from a Chinese BERT (as the wwm models were made from Google's):

  bert-jax pretrain --config configs/chinese_wwm_ext.py:/path/to/vocab.txt --workdir DIR \
      --config.data.input='["zh_corpus.txt"]' --config.init_from=/path/to/bert-base-chinese

--config.data.masked_lm_prob=0.2 gives Hugging Face's mlm_probability 0.2 (raise
--config.phases.0.max_predictions with it: 0.2 x 510 = 102); --config.data.doc_sentences=true
keeps rows within documents.
"""

import pathlib
import runpy

common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))
phase = common["phase"]


def get_config(arg=None):
  c = common["base_config"]()
  c.objective = "mlm"
  c.model.preset = "chinese-base"
  c.total_steps = 100_000
  c.phases = [phase(1.0, 512, 80, 384)]   # 15% of 510 tokens = 77 predictions at most
  c.data.vocab = arg or ""
  c.data.vocab_required = True
  c.data.vocab_size = 21128
  c.data.lower_case = True
  c.data.whole_word_mask = True   # segmentation by jieba: mask all characters of a word
  c.data.dynamic_masking = True   # RoBERTa's: fresh masks each epoch, not dupe_factor fixed ones
  c.data.dupe_factor = 1
  c.optim.name = "lamb"           # the wwm models' optimizer
  c.optim.learning_rate = 1e-4
  c.optim.bias_correction = True
  c.optim.warmup_steps = 10_000
  return c
