"""The training core shared by pretraining and fine-tuning: state, steps, optimizers and the
phase schedule they follow, sharding, one run per directory, preemption."""
