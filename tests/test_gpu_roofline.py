"""bert_jax/devices/roofline.py and tools/gpu_roofline.py: the bytes and matmul FLOPs read from a
compiled GPU program, and the bound they give."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))

import gpu_roofline  # noqa: E402

from bert_jax.devices import roofline  # noqa: E402

# A compiled program's text as XLA prints it (trimmed): a matmul fusion, a kernel writing a
# buffer in place, a loop whose body holds an elementwise fusion, a fusion that slices a buffer
# (an all-reduce's, say) and instructions that are no kernels (parameters, bitcasts, tuples).
_HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_dot (p0: bf16[64,32], p1: bf16[32,16]) -> f32[64,16] {
  %p0 = bf16[64,32]{1,0} parameter(0)
  %p1 = bf16[32,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[64,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_add (q0: f32[64,16]) -> f32[64,16] {
  %q0 = f32[64,16]{1,0} parameter(0)
  ROOT %add.2 = f32[64,16]{1,0} add(%q0, %q0)
}

%wrapped_slice_computation (s0: f32[4096], s1: f32[16]) -> f32[48] {
  %s0 = f32[4096]{0} parameter(0)
  %slice.1 = f32[16]{0} slice(%s0), slice={[0:16]}
  %slice.2 = f32[16]{0} slice(%s0), slice={[16:32]}
  %s1 = f32[16]{0} parameter(1)
  ROOT %concatenate.3 = f32[48]{0} concatenate(%slice.1, %slice.2, %s1), dimensions={0}
}

%body (b0: (s32[], f32[64,16])) -> (s32[], f32[64,16]) {
  %b0 = (s32[], f32[64,16]{1,0}) parameter(0)
  %gte.1 = f32[64,16]{1,0} get-tuple-element(%b0), index=1
  %loop_add_fusion.3 = f32[64,16]{1,0} fusion(%gte.1), kind=kLoop, calls=%fused_add
  %gte.2 = s32[] get-tuple-element(%b0), index=0
  ROOT %tuple.4 = (s32[], f32[64,16]{1,0}) tuple(%gte.2, %loop_add_fusion.3)
}

ENTRY %main (a: bf16[64,32], b: bf16[32,16], c: bf16[8,128]) -> f32[] {
  %a = bf16[64,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  %c = bf16[8,128]{1,0} parameter(2)
  %gemm_fusion_dot.7 = f32[64,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot
  %bitcast.8 = bf16[1024]{0} bitcast(%c)
  %pallas_call.9 = bf16[8,128]{1,0} custom-call(%a, %c), custom_call_target="__gpu$xla.gpu.triton", output_to_operand_aliasing={{}: (1, {})}
  %loop = (s32[], f32[64,16]{1,0}) while(%t), condition=%cond, body=%body
  %d = f32[4096]{0} parameter(3)
  %e = f32[16]{0} parameter(4)
  %wrapped_slice.11 = f32[48]{0} fusion(%d, %e), kind=kLoop, calls=%wrapped_slice_computation
  ROOT %copy.10 = f32[64,16]{1,0} copy(%gemm_fusion_dot.7)
}
"""


def test_kernels_count_each_kernels_bytes_and_matmul_flops():
  rows = {row["name"]: row for row in roofline.kernels(_HLO)}
  assert set(rows) == {"gemm_fusion_dot.7", "pallas_call.9", "loop_add_fusion.3", "copy.10",
                       "wrapped_slice.11"}
  # a buffer read only through slices counts as the slices' bytes; a plain operand whole
  assert rows["wrapped_slice.11"]["bytes"] == 48 * 4 + 2 * 16 * 4 + 16 * 4
  gemm = rows["gemm_fusion_dot.7"]
  assert gemm["kind"] == "gemm_fusion_dot" and gemm["result"] == "f32[64,16]"
  assert gemm["bytes"] == 64 * 16 * 4 + 64 * 32 * 2 + 32 * 16 * 2
  assert gemm["flops"] == 2 * 64 * 16 * 32
  # the buffer written in place counts once, as the result; a is read
  assert rows["pallas_call.9"] == dict(name="pallas_call.9", kind="pallas_call",
                                       result="bf16[8,128]", bytes=8 * 128 * 2 + 64 * 32 * 2,
                                       flops=0.0, loop=False)
  assert rows["loop_add_fusion.3"]["bytes"] == 2 * 64 * 16 * 4  # the loop's body, once
  assert rows["loop_add_fusion.3"]["loop"] and not rows["gemm_fusion_dot.7"]["loop"]
  assert rows["copy.10"]["bytes"] == 2 * 64 * 16 * 4


def test_bound_takes_the_larger_of_traffic_and_matmul_per_kernel():
  rows = [dict(name="a", kind="gemm", result="x", bytes=1e9, flops=4e12),
          dict(name="b", kind="loop", result="y", bytes=2e9, flops=0.0),
          dict(name="c", kind="loop", result="y", bytes=1e9, flops=0.0)]
  out = roofline.bound(rows, bandwidth=1e12, peak=1e15)
  assert out["ms"] == pytest.approx(4.0 + 2.0 + 1.0)
  assert [g["group"] for g in out["groups"]] == ["gemm x", "loop y"]
  assert out["groups"][1] == dict(group="loop y", kernels=2, ms=pytest.approx(3.0), gb=3.0)



def test_bound_counts_a_loops_kernels_once_per_trip():
  """Gradient accumulation's loop body runs once per micro-batch; the program shows it once."""
  rows = [dict(name="update", kind="loop", result="x", bytes=1e9, flops=0.0, loop=False),
          dict(name="body", kind="gemm", result="y", bytes=1e9, flops=4e12, loop=True)]
  out = roofline.bound(rows, bandwidth=1e12, peak=1e15, trips=8)
  assert out["ms"] == pytest.approx(1.0 + 8 * 4.0)
  assert out["kernels"] == 9 and out["tflop"] == pytest.approx(32.0)

@pytest.mark.parametrize("argv,named", [
    (["--config", "configs/tiny_cpu.py", "--topology", "v5e:2x2"], "--topology v5e:2x2"),
    (["--config", "configs/no_such.py"], "no_such.py"),
    (["--config", "configs/tiny_cpu.py", "--phase", "3"], "--phase 3")])
def test_bad_input_is_one_line_and_exit_2(argv, named, capsys):
  assert gpu_roofline.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and named in err and "\n" not in err


def test_a_compiled_gpu_step_holds_the_models_matmul_flops():
  """The tiny config's step compiled for an H100 (no GPU attached): the matmul FLOPs read from
  its unfused program are the model's, forward and backward (1.0003x: the model count leaves
  out the pooler's small products); with the kernel, attention's matmuls are inside Pallas
  calls, whose FLOPs the program does not show, and the [B,N,T,S] tensors' bytes are gone."""
  from bert_jax.devices import mfu
  from bert_jax.errors import UserError
  from bert_jax.pretraining import plan
  from bert_jax.pretraining.run_config import resolve_config
  try:
    target = plan.load_target("h100:1")
  except UserError as e:  # no CUDA plugin: nothing to compile for
    pytest.skip(str(e))
  config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                        "tiny_cpu.py")
  overrides = [("phases", "[{'fraction': 1.0, 'seq_len': 128, 'max_predictions': 20, "
                          "'batch_size': 16, 'grad_accum': 1}]"), ("total_steps", "100"),
               ("model.dtype", "bfloat16")]
  steps = {}
  for attention in ("xla", "pallas"):
    compiled = gpu_roofline.compile_step(config, overrides + [("model.attention", attention)],
                                         target, 1)
    steps[attention] = roofline.kernels(compiled.as_text())
  model_config = plan.model_config_of(resolve_config(config, overrides))
  model_flops = 16 * mfu.train_flops_per_sequence(model_config, 128, 20)
  flops = {k: sum(row["flops"] for row in rows) for k, rows in steps.items()}
  traffic = {k: sum(row["bytes"] for row in rows) for k, rows in steps.items()}
  assert model_flops <= flops["xla"] <= 1.01 * model_flops
  assert flops["pallas"] < flops["xla"] and traffic["pallas"] < traffic["xla"]
