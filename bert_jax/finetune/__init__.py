"""Fine-tuning in Flax: `python -m bert_jax.finetune --task {classification,token,qa,choice}`.

tasks.py reads and featurises each task's files; specs.py says per task which head, loss,
metrics and predictions file apply; trainer.py runs the jitted loop; metrics.py scores; qa.py
and squad_eval.py do span QA's featurisation, n-best and the official EM/F1.
"""

from __future__ import annotations

TASK_NAMES = ("classification", "token", "qa", "choice")
