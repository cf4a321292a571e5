"""Hardware: which platform a host has, AOT plans for TPU topologies, MFU, host memory, the XLA
compilation cache."""
