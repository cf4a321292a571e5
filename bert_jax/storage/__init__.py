"""On-disk state: orbax checkpoints and exported params, their integrity checks, local and
remote file I/O."""
