#!/usr/bin/env bash
# One command for an accelerator machine without network access: the kernel, model, step and
# dropout tests on its device, the pretraining benchmark (bert-jax side) with fused attention on
# and off, and `bert-jax plan --topology local`; one JSON of the numbers.
#
#   tools/device_check.sh [--cpu] [--out DIR]
#
# GPU mode (default), sized to finish within about 8 minutes on one H200: the attention tests
# and the check a run makes of the kernel (bert_jax/modeling/kernel_check.py), attention alone
# (compile and step time of xla / pallas / cudnn, tools/bench_attention.py), then
#   BERT-base 128 x 256, BERT-base 512 x 64, BERT-large 128 x 64, bfloat16, attention xla
#   (unfused, dropout 0.1), fast (auto, attention dropout 0: cuDNN) and pallas (dropout inside),
#   each then traced for 3 more steps: where the device's time goes, per kind of kernel and the
#   top kernels (tools/kernel_profile.py), for tuning after the machine has gone back.
# Every step has its own timeout and log, so one that hangs costs its timeout, not the run, and
# the whole keeps within --budget seconds (default 480): a step that would start past it is
# skipped and recorded as such, so the JSON always comes out. Where the kernel fails alone
# (attention alone, dropout 0.1) its training cases are skipped instead of failing slowly.
# --cpu: the same steps on tiny shapes (CI runs it, so the script cannot rot); the tests run
# on GPUs only (CI runs them anyway).
# Packages the machine lacks travel as wheels in .whl/ (README, "Measuring on a GPU").
# Writes two files into DIR (default: $OUT when set, else device_check/), as a lent machine
# sends back only a few: device_check.json and device_check_logs.tar.gz (one log per step).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
out="${OUT:-device_check}"
budget=480
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu ;;
    --out) out="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    *) echo "device_check.sh: unknown argument $1 (expected --cpu, --out DIR, --budget S)" >&2
       exit 2 ;;
  esac
  shift
done
[[ "$budget" =~ ^[0-9]+$ ]] || { echo "device_check.sh: --budget $budget: expected seconds" >&2; exit 2; }
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
deadline=$((SECONDS + budget))
# limit T NAME: prints the step's timeout (T, or what is left of the budget); where under 20 s
# is left, writes NAME's log as skipped and fails.
limit() {
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "skipped: the budget of ${budget} s ran out" > "$work/$2.log"
    return 1
  fi
  echo $(( left < $1 ? left : $1 ))
}
# timed T LOG CMD...: CMD under `timeout T`, its output in LOG, and a last line saying so
# where it ran out of time
timed() {
  local t="$1" log="$2"
  shift 2
  timeout "$t" "$@" > "$log" 2>&1
  local rc=$?
  [ "$rc" -eq 124 ] && printf "\ntimed out after %s s\n" "$t" >> "$log"
  return "$rc"
}
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
  alone=(--batch 2 --seq-len 64 --heads 2 --head-dim 16 --dtype float32 --steps 2)
  steps=2
  profile=1
  plan_config="configs/tiny_cpu.py"
else
  cases="base:128:256 base:512:64 large:128:64"
  attentions="xla fast pallas"
  alone=()  # bench_attention's defaults: BERT-base 128 x 64 in bfloat16
  steps=10
  profile=3
  plan_config="configs/bert_base_paper.py"
fi

run_tests() {  # the GPU's own run of the tests (tests/conftest.py pins float32 matmuls and
  # deterministic scatters there); no preallocation, so PyTorch's reference runs beside jax
  [ "$mode" = gpu ] || return 0
  local t
  if t=$(limit "$1" "$2"); then
    XLA_PYTHON_CLIENT_PREALLOCATE=false timed "$t" "$work/$2.log" \
      "$python" -m pytest -q -o addopts="" -p no:cacheprovider "${@:3}"
  fi
  echo "$2: $(tail -1 "$work/$2.log")"
}

run_tests 150 tests_attention tests/test_attention.py
# the check a GPU run makes before it trains through the kernel (kernel_check), with its time
if [ "$mode" = gpu ] && t=$(limit 120 kernel_check); then
  timed "$t" "$work/kernel_check.log" "$python" -c 'from bert_jax.config import BertConfig
from bert_jax.modeling import kernel_check
print(kernel_check.verify(BertConfig(dtype="bfloat16"), [128, 512]))'
  echo "kernel_check: $(tail -1 "$work/kernel_check.log")"
fi
# attention alone: compile and step times apart, per implementation
for rate in 0.1 0.0; do
  impls="xla pallas"; [ "$rate" = 0.0 ] && impls="xla pallas cudnn"
  t=$(limit 240 "attention_$rate") && timed "$t" "$work/attention_$rate.log" \
    "$python" tools/bench_attention.py "${alone[@]}" --rate "$rate" --implementations $impls \
    --json-out "$work/attention_$rate.json"
  echo "attention alone, dropout $rate:"; grep '^{' "$work/attention_$rate.log"
done
# The kernel's training cases only where it compiled and ran alone (a step skipped for the
# budget leaves the cases to say so themselves)
alone_log="$work/attention_0.1.log"
if ! grep -q '^skipped' "$alone_log" && { ! grep -q '"implementation": "pallas"' "$alone_log" \
    || grep '"implementation": "pallas"' "$alone_log" | grep -q '"error"'; }; then
  kernel_failed=1
fi
for case in $cases; do
  IFS=: read -r preset seq batch <<< "$case"
  for attn in $attentions; do
    name="${preset}_${seq}x${batch}_${attn}"
    # xla: unfused, the paper's attention dropout; fast: auto with attention dropout 0 (cuDNN on
    # a GPU); pallas: this project's kernel, dropout inside
    flags=(--attention "$attn")
    [ "$attn" = fast ] && flags=(--attention auto --attention-dropout 0)
    if [ "$attn" = pallas ] && [ -n "${kernel_failed:-}" ]; then
      echo "skipped: the kernel failed alone (attention_0.1.log)" > "$work/$name.log"
    elif t=$(limit 150 "$name"); then
      timed "$t" "$work/$name.log" "$python" tools/bench_pretrain.py --side jax \
        --preset "$preset" --seq-len "$seq" --batch-size "$batch" --dtype bfloat16 \
        "${flags[@]}" --steps "$steps" --warmup 2 --profile-steps "$profile" --plain-malloc \
        --json-out "$work/$name.json"
    fi
    echo "$name: $(grep -E '^bert-jax |^skipped' "$work/$name.log" | head -1)"
  done
done
if t=$(limit 150 plan); then
  timeout "$t" "$python" -m bert_jax.cli plan --config "$plan_config" --topology local \
    --phase 1 --json > "$work/plan.json" 2> "$work/plan.log"
  rc=$?
  [ "$rc" -eq 124 ] && echo "timed out after $t s" >> "$work/plan.log"
  echo "plan --topology local: exit $rc"
fi
run_tests 200 tests tests/test_ops.py tests/test_model.py tests/test_steps.py \
  tests/test_dropout.py
"$python" - "$work" "$mode" "$out" <<'PY'
import glob, json, os, re, sys
work, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, "tools")
from kernel_profile import format_summary
tail = lambda path, n: open(path).read()[-n:] if os.path.exists(path) else "(no log)"
cases = []
for log in sorted(glob.glob(os.path.join(work, "*_*x*_*.log")), key=os.path.getmtime):
  name = os.path.basename(log)[:-4]
  path = log[:-4] + ".json"
  if os.path.exists(path):
    for row in json.load(open(path)):
      cases.append(dict(case=name, **{k: row.get(k) for k in (
          "preset", "seq_len", "batch_size", "dtype", "attention", "sequences_per_s",
          "tokens_per_s", "mfu", "step_s", "warmup_s", "peak_device_memory_gb", "peak_rss_mb",
          "device", "profile")}))
  else:
    cases.append(dict(case=name, error=tail(log, 1500)))
report = dict(mode=mode, cases=cases)
for path in sorted(glob.glob(os.path.join(work, "attention_*.json"))):
  report.setdefault("attention_alone", []).extend(json.load(open(path)))
for name in ("tests_attention", "tests"):
  path = os.path.join(work, name + ".log")
  if os.path.exists(path):
    last = (open(path).read().strip().splitlines() or ["(no output)"])[-1]
    # where anything failed or it timed out, the log's last lines (the whole is in the tarball)
    passed = re.search(r"\d+ passed", last) and not re.search(r"failed|error", last)
    report[name] = last if passed else tail(path, 3000)
if os.path.exists(os.path.join(work, "kernel_check.log")):
  report["kernel_check"] = tail(os.path.join(work, "kernel_check.log"), 1500).strip()
try:
  report["plan"] = json.load(open(os.path.join(work, "plan.json")))
except (OSError, ValueError):
  report["plan"] = dict(error=tail(os.path.join(work, "plan.log"), 1500))
json.dump(report, open(os.path.join(out, "device_check.json"), "w"), indent=1)
print(f"{'case':<22}{'seq/s':>9}{'tokens/s':>11}{'MFU':>7}{'peak GB':>9}")
for c in cases:
  if "error" in c:
    print(f"{c['case']:<22} failed: {(c['error'].strip().splitlines() or ['?'])[-1][:100]}")
  else:
    mfu = f"{100 * c['mfu']:6.1f}%" if c.get("mfu") else "    n/a"
    mem = c.get("peak_device_memory_gb")
    print(f"{c['case']:<22}{c['sequences_per_s']:>9.1f}{c['tokens_per_s']:>11.0f}{mfu:>7}"
          f"{mem if mem is None else round(mem, 1)!s:>9}")
    if c.get("profile"):
      print(f"  {format_summary(c['profile'])}")
print(f"wrote {os.path.join(out, 'device_check.json')} and device_check_logs.tar.gz")
sys.exit(0 if cases and not any("error" in c for c in cases) else 1)
PY
status=$?
tar -czf "$out/device_check_logs.tar.gz" -C "$work" .
exit $status
