"""The training core shared by pretraining and fine-tuning: state, steps, optimizers, sharding, one run per directory, preemption."""
