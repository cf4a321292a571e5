"""The pretraining run: its config, workdir, loop and metrics, and `bert-jax plan` (its train
step compiled ahead of time for a TPU topology)."""
