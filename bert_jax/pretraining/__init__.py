"""The pretraining run: its config, workdir, loop and metrics."""
