"""The model: Flax Linen BERT, its heads, kernels (ops, attention, flash) and dropout."""
