"""The pretraining run: its config, phases, workdir, loop and metrics."""
