"""Fine-tuning in Flax: `python -m bert_jax.finetune --task {classification,token,qa,choice}`.

run_config.py: the run's settings, frozen, from the command line. readers.py (and
paragraphs.py, the homework layout) read each task's files; featurize.py turns records into
arrays; tasks.py says per task which head, loss, metrics and predictions file apply;
batching.py and packing.py cut the arrays into batches; evaluate.py runs the model over them
(predictions and the loss's sums); trainer.py runs the jitted loop; predict.py predicts on
files without labels; metrics.py scores; qa.py and squad_eval.py do span QA's featurisation,
n-best and the official EM/F1.
"""

from __future__ import annotations

TASK_NAMES = ("classification", "token", "qa", "choice")
