"""Hardware: which platform a host has, MFU, host memory, the XLA compilation cache."""
