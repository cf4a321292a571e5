"""Chinese BERT-Base (bert-base-chinese shape: 21128 vocab) with whole-word masking.

The vocab is given by the user, e.g. Google's bert-base-chinese vocab.txt:
  bert-jax pretrain --config configs/chinese_base.py:/path/to/vocab.txt --workdir DIR \
      --config.data.input='["zh_corpus.txt"]'
(or --config.data.vocab=PATH). Continued pretraining from a Chinese BERT on domain text:
  add --config.init_from=HF_DIR (its vocab.txt is used when no vocab is given).
"""

import pathlib
import runpy

common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))


def get_config(arg=None):
  c = common["base_config"]()
  c.model.preset = "chinese-base"
  c.data.vocab = arg or ""
  c.data.vocab_required = True
  c.data.vocab_size = 21128
  c.data.lower_case = True
  c.data.whole_word_mask = True   # segmentation by jieba: mask all characters of a word
  return c
