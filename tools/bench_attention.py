"""Attention alone, forward + backward, per implementation: compile time and step time.

  python tools/bench_attention.py --batch 64 --seq-len 128 --heads 12 --head-dim 64 \\
      --implementations xla pallas cudnn --rate 0.1 --json-out attention.json

Each implementation is timed in this process on the default device: the compile of the jitted
gradient (so a slow kernel compile shows apart from a slow kernel) and its temporary memory
(XLA's memory analysis), then the mean of --steps calls. An implementation that fails or does
not apply (cudnn off a GPU, splash off a TPU, a dropout rate the kernel cannot take) is reported
with its error; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def bench(impl: str, args) -> dict:
  import jax
  import jax.numpy as jnp

  from bert_jax.modeling import attention

  shape = (args.batch, args.seq_len, args.heads, args.head_dim)
  data_key, dropout_key = jax.random.split(jax.random.PRNGKey(0))
  # q, k and v as the model's fused projection makes them (attention.fuse), and its bias, which
  # the Pallas kernel adds as it reads and the other paths in a pass of their own
  kvq = jax.random.normal(data_key, (args.batch, args.seq_len, 3, args.heads, args.head_dim),
                          jnp.dtype(args.dtype))
  bias = jnp.full((3, args.heads, args.head_dim), 0.1, kvq.dtype)
  segments = attention.Segments(None, jnp.ones(shape[:2], jnp.int32))
  rate = args.rate

  def loss(kvq, bias):
    out = attention.attend(kvq, segments, bias_3NH=bias, rate=rate,
                           key=dropout_key if rate else None, implementation=impl)
    return jnp.sum(out.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  row = dict(implementation=impl, shape=list(shape), dtype=args.dtype, rate=rate)
  try:
    start = time.perf_counter()
    compiled = grad.lower(kvq, bias).compile()
    row["compile_s"] = time.perf_counter() - start
    # XLA's scratch for the whole forward + backward: where [B,N,T,S] tensors or the kernels'
    # statistics would show.
    row["temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    jax.block_until_ready(compiled(kvq, bias))
    start = time.perf_counter()
    for _ in range(args.steps):
      out = compiled(kvq, bias)
    jax.block_until_ready(out)
    row["step_ms"] = 1000 * (time.perf_counter() - start) / args.steps
    # Useful work: 2 forward matmuls (q·k, p·v) and 4 backward (dv, dp, dq, dk), 2·B·N·T·S·H
    # FLOPs each; a flash kernel's recomputed q·k (and dp) is not counted.
    flops = 6 * 2 * args.batch * args.heads * args.seq_len ** 2 * args.head_dim
    row["tflops"] = flops / (row["step_ms"] / 1000) / 1e12
  except Exception as e:  # reported, not raised: the other implementations still run
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
  return row


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--rate", type=float, default=0.1, help="attention dropout (0: none)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--implementations", nargs="+", default=["xla", "pallas"])
  p.add_argument("--json-out")
  args = p.parse_args(argv)
  rows = []
  for impl in args.implementations:
    row = bench(impl, args)
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
