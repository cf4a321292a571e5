#!/usr/bin/env bash
# One command for an accelerator machine without network access: the kernel, model, step and
# dropout tests on its device, the pretraining benchmark (bert-jax side) with fused attention on
# and off, and `bert-jax plan --topology local`; one JSON of the numbers.
#
#   tools/device_check.sh [--cpu] [--out DIR]
#
# GPU mode (default), sized to finish within about 8 minutes on one H200: attention alone
# (compile and step time of xla / pallas / cudnn, tools/bench_attention.py), then
#   BERT-base 128 x 256, BERT-base 512 x 64, BERT-large 128 x 64, bfloat16, attention xla
#   (unfused, dropout 0.1), fast (auto, attention dropout 0: cuDNN) and pallas (dropout inside),
#   each then traced for 3 more steps: where the device's time goes, per kind of kernel and the
#   top kernels (tools/kernel_profile.py), for tuning after the machine has gone back.
# Every step has its own timeout and log, so one that hangs costs its timeout, not the run.
# --cpu: the same steps on tiny shapes (CI runs it, so the script cannot rot).
# Packages the machine lacks travel as wheels in .whl/ (README, "Measuring on a GPU").
# Writes DIR/device_check.json (default: $OUT when set, else device_check/) and one log per step.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
out="${OUT:-device_check}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu ;;
    --out) out="$2"; shift ;;
    *) echo "device_check.sh: unknown argument $1 (expected --cpu, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
python="${PYTHON:-python3}"
if [ "$mode" = gpu ] && compgen -G ".whl/*.whl" > /dev/null; then
  site="${TMPDIR:-/tmp}/bert-jax-wheels"
  "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
    .whl/*.whl || exit 2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$mode" = cpu ]; then
  export JAX_PLATFORMS=cpu
  cases="tiny:64:4"
  attentions="xla fast"
  steps=2
  profile=1
  plan_config="configs/tiny_cpu.py"
else
  cases="base:128:256 base:512:64 large:128:64"
  attentions="xla fast pallas"
  steps=10
  profile=3
  plan_config="configs/bert_base_paper.py"
fi

run_tests() {  # the GPU's own run of the tests (tests/conftest.py pins float32 matmuls and
  # deterministic scatters there); no preallocation, so PyTorch's reference runs beside jax
  [ "$mode" = gpu ] || return 0
  XLA_PYTHON_CLIENT_PREALLOCATE=false \
    timeout "$1" "$python" -m pytest -q -o addopts="" -p no:cacheprovider "${@:3}" > "$out/$2.log" 2>&1
  echo "$2: $(tail -1 "$out/$2.log")"
}

run_tests 150 tests_attention tests/test_attention.py
if [ "$mode" = gpu ]; then  # attention alone at BERT-base 128 x 64: compile and step times apart
  for rate in 0.1 0.0; do
    impls="xla pallas"; [ "$rate" = 0.0 ] && impls="xla pallas cudnn"
    timeout 240 "$python" tools/bench_attention.py --rate "$rate" --implementations $impls \
      --json-out "$out/attention_$rate.json" > "$out/attention_$rate.log" 2>&1
    echo "attention alone, dropout $rate:"; grep '^{' "$out/attention_$rate.log"
  done
fi
for case in $cases; do
  IFS=: read -r preset seq batch <<< "$case"
  for attn in $attentions; do
    name="${preset}_${seq}x${batch}_${attn}"
    # xla: unfused, the paper's attention dropout; fast: auto with attention dropout 0 (cuDNN on
    # a GPU); pallas: this project's kernel, dropout inside
    flags=(--attention "$attn")
    [ "$attn" = fast ] && flags=(--attention auto --attention-dropout 0)
    timeout 150 "$python" tools/bench_pretrain.py --side jax --preset "$preset" --seq-len "$seq" \
      --batch-size "$batch" --dtype bfloat16 "${flags[@]}" --steps "$steps" --warmup 2 \
      --profile-steps "$profile" --plain-malloc --json-out "$out/$name.json" > "$out/$name.log" 2>&1
    echo "$name: exit $? $(grep -E '^bert-jax ' "$out/$name.log" | head -1)"
  done
done
timeout 150 "$python" -m bert_jax.cli plan --config "$plan_config" --topology local --phase 1 \
  --json > "$out/plan.json" 2> "$out/plan.log"
echo "plan --topology local: exit $?"
run_tests 200 tests tests/test_ops.py tests/test_model.py tests/test_steps.py \
  tests/test_dropout.py
"$python" - "$out" "$mode" <<'PY'
import glob, json, os, sys
out, mode = sys.argv[1], sys.argv[2]
sys.path.insert(0, "tools")
from kernel_profile import format_summary
cases = []
for log in sorted(glob.glob(os.path.join(out, "*_*x*_*.log")), key=os.path.getmtime):
  name = os.path.basename(log)[:-4]
  path = log[:-4] + ".json"
  if os.path.exists(path):
    for row in json.load(open(path)):
      cases.append(dict(case=name, **{k: row.get(k) for k in (
          "preset", "seq_len", "batch_size", "dtype", "attention", "sequences_per_s",
          "tokens_per_s", "mfu", "step_s", "warmup_s", "peak_device_memory_gb", "peak_rss_mb",
          "device", "profile")}))
  else:
    cases.append(dict(case=name, error=open(log).read()[-1500:]))
report = dict(mode=mode, cases=cases)
for path in sorted(glob.glob(os.path.join(out, "attention_*.json"))):
  report.setdefault("attention_alone", []).extend(json.load(open(path)))
for name in ("tests_attention", "tests"):
  path = os.path.join(out, name + ".log")
  if os.path.exists(path):
    report[name] = (open(path).read().strip().splitlines() or ["(no output)"])[-1]
try:
  report["plan"] = json.load(open(os.path.join(out, "plan.json")))
except (OSError, ValueError):
  report["plan"] = dict(error=open(os.path.join(out, "plan.log")).read()[-1500:])
json.dump(report, open(os.path.join(out, "device_check.json"), "w"), indent=1)
print(f"{'case':<22}{'seq/s':>9}{'tokens/s':>11}{'MFU':>7}{'peak GB':>9}")
for c in cases:
  if "error" in c:
    print(f"{c['case']:<22} failed: {c['error'].strip().splitlines()[-1][:100]}")
  else:
    mfu = f"{100 * c['mfu']:6.1f}%" if c.get("mfu") else "    n/a"
    mem = c.get("peak_device_memory_gb")
    print(f"{c['case']:<22}{c['sequences_per_s']:>9.1f}{c['tokens_per_s']:>11.0f}{mfu:>7}"
          f"{mem if mem is None else round(mem, 1)!s:>9}")
    if c.get("profile"):
      print(f"  {format_summary(c['profile'])}")
print(f"wrote {os.path.join(out, 'device_check.json')}")
sys.exit(0 if cases and not any("error" in c for c in cases) else 1)
PY
