#!/usr/bin/env bash
# QLoRA's NLL check (issue 20): does a LoRA trained on a 4-bit NF4 base score within 2% of the
# same LoRA trained on a bf16 base? In one run:
#   1. builds a dataset from the markdown of PRETRAIN_CORPUS (llmtool data build);
#   2. trains a model of Llama-3.2-1B's shape from scratch on it in bf16 (STEPS steps of
#      8 x 512, bench/qlora-nll-base.yaml) and saves it in bf16;
#   3. LoRA-fine-tunes that model twice on FINETUNE_CORPUS (r 16, alpha 32, every linear layer,
#      LORA_STEPS steps, checkpointing, bench/qlora-nll-lora.yaml), with lora.base_dtype bf16
#      and nf4 and nothing else changed: same seed, same batches;
#   4. scores both adapters on the base each was trained on (eval --nf4 for the NF4 one) on the
#      fine-tuning dataset's held-out split, and prints both NLLs, their relative difference
#      and PASS/FAIL against TOL (0.02), with each run's last logged training loss.
# Writes qlora-nll.txt (summary, then every command's output) and qlora-nll.json (the numbers,
# the eval rows and the three runs' metrics.jsonl) to $OUT, else to runs/qlora-nll-out.
#
#   [OUT=DIR] [LLMTOOL=./llmtool] [DEVICE=cuda] [SHAPE=1b|tiny] [STEPS=N] [LORA_STEPS=50] \
#       bench/gpu_qlora_nll.sh [PRETRAIN_CORPUS] [FINETUNE_CORPUS]
#
# Carried in .device/: llmtool.gz (../shared/cuda/build.sh --bin llmtool; unpacked here when
# ./llmtool is missing), this script with qlora-nll-base.yaml and qlora-nll-lora.yaml beside it,
# and the two corpora (copies of ../shared/corpus/book and ../shared/corpus/tldr); then, from
# .device/:
#   OUT=$OUT bash gpu_qlora_nll.sh corpus/book corpus/tldr
# Estimated 3 to 5 minutes on an H200 (not yet run there): 700 base steps of 4,096 tokens at
# ~50K tokens/s is ~1 minute; the base's 12 GB training state, two 50-step fine-tunes and two
# evals (each scores the bare base and the adapter) are the rest.
# On a CPU, with a tiny shape (hidden 64, 2 layers, seq 64) in a few minutes:
#   LLMTOOL=target/debug/llmtool DEVICE=cpu SHAPE=tiny bench/gpu_qlora_nll.sh
# Every command runs under `timeout` (TIMEOUT seconds each, default 600); WORK (default
# runs/qlora-nll-work, replaced each run) holds the runs.
set -u
here=$(cd "$(dirname "$0")" && pwd)
llmtool=${LLMTOOL:-./llmtool}
if [ ! -x "$llmtool" ] && [ -f "$llmtool.gz" ]; then
  gunzip -f "$llmtool.gz" && chmod +x "$llmtool"
fi
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
book=${1:-${PRETRAIN_CORPUS:-../shared/corpus/book}}
tldr=${2:-${FINETUNE_CORPUS:-../shared/corpus/tldr}}
device=${DEVICE:-cuda}
shape=${SHAPE:-1b}
out=${OUT:-runs/qlora-nll-out}
work=${WORK:-runs/qlora-nll-work}
limit=${TIMEOUT:-600}
tol=${TOL:-0.02}
lora_steps=${LORA_STEPS:-50}

# The shape: Llama-3.2-1B's (the yaml's), or a tiny one for a CPU check (its widths, like
# Llama's, are whole runs of NF4's 64 weights).
case $shape in
  1b) steps=${STEPS:-700}; seq=${SEQ_LEN:-512}; shape_set=() ;;
  tiny)
    steps=${STEPS:-40}; seq=${SEQ_LEN:-64}
    shape_set=(--set model.hidden_size=64 --set model.num_hidden_layers=2
      --set model.num_attention_heads=4 --set model.num_key_value_heads=2
      --set model.intermediate_size=256 --set model.vocab_size=2048 --set training.lr=2e-3) ;;
  *) echo "SHAPE must be 1b or tiny, not $shape" >&2; exit 2 ;;
esac
warmup=$(( steps / 10 < 50 ? steps / 10 : 50 ))
lora_warmup=$(( lora_steps / 10 ))

if [ -e "$work" ] && [ ! -f "$work/log.txt" ]; then
  echo "WORK=$work exists and is not this script's work directory" >&2; exit 2
fi
rm -rf "$work"
mkdir -p "$work" "$out"
log=$work/log.txt
: > "$log"
failed=""
run() { # run NAME COMMAND...: COMMAND under timeout, its output appended to the log
  local name=$1 rc start=$SECONDS
  shift
  echo "== $name: $*" >> "$log"
  timeout -k 60 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  echo "== $name: rc=$rc, $((SECONDS - start)) s" >> "$log"
  echo "$name rc=$rc $((SECONDS - start))s" >&2
  [ $rc = 0 ] || failed="$failed $name(rc=$rc)"
  return $rc
}

{
  "$llmtool" --version
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  echo "device=$device shape=$shape steps=$steps seq_len=$seq lora_steps=$lora_steps"
  echo "pretrain corpus=$book finetune corpus=$tldr"
} >> "$log" 2>&1

base_set=(--set "data.roots=[$book]" --set "output.dir=$work/base" --set training.seq_len=$seq
  --set training.max_steps=$steps --set training.warmup_steps=$warmup "${shape_set[@]}")
lora_set=(--set "model.pretrained=$work/base/model" --set "data.roots=[$tldr]"
  --set "data.dataset_dir=$work/tldr-dataset" --set training.seq_len=$seq
  --set training.max_steps=$lora_steps --set training.warmup_steps=$lora_warmup
  --set training.eval_every=$lora_steps --set training.save_every=$lora_steps)
eval_args=(--dataset "$work/tldr-dataset" --split val --context "$seq" --stride $((seq / 2))
  --dtype bf16 --device "$device" --json)

run data-build "$llmtool" data build "$here/qlora-nll-base.yaml" "${base_set[@]}" \
  && run data-stats "$llmtool" data stats "$work/base/dataset" \
  && run train "$llmtool" train "$here/qlora-nll-base.yaml" "${base_set[@]}" --device "$device" \
  && for base_dtype in bf16 nf4; do
    run "finetune-$base_dtype" "$llmtool" finetune "$here/qlora-nll-lora.yaml" --lora \
      "${lora_set[@]}" --set lora.base_dtype=$base_dtype --set "output.dir=$work/lora-$base_dtype" \
      --device "$device" || break
  done \
  && run eval-bf16 sh -c '"$@" > "'"$work"'/eval-bf16.json"' - "$llmtool" eval \
    --model "$work/base/model" --adapter "$work/lora-bf16/adapter" "${eval_args[@]}" \
  && run eval-nf4 sh -c '"$@" > "'"$work"'/eval-nf4.json"' - "$llmtool" eval --nf4 \
    --model "$work/base/model" --adapter "$work/lora-nf4/adapter" "${eval_args[@]}"

# The comparison, from the eval JSON and the runs' metrics.jsonl (whatever of them exists).
python3 - "$work" "$out" "$tol" "$failed" <<'PY'
import json, os, sys
work, out, tol, failed = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4].split()

def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def metrics(run):
    try:
        with open(os.path.join(work, run, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []

def summary(records):
    losses = [r for r in records if r.get("loss") is not None]
    vals = [r for r in records if r.get("val_loss") is not None]
    rates = [r["tokens_per_sec"] for r in losses if r.get("tokens_per_sec")][1:]
    return {
        "last_step": losses[-1]["step"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
        "first_loss": losses[0]["loss"] if losses else None,
        "val_loss": vals[-1]["val_loss"] if vals else None,
        "mean_tokens_per_sec": sum(rates) / len(rates) if rates else None,
    }

runs = {name: metrics(name) for name in ("base", "lora-bf16", "lora-nf4")}
result = {"tolerance": tol, "failed_commands": failed,
          "runs": {name: summary(records) for name, records in runs.items()}}
lines = []
for base_dtype in ("bf16", "nf4"):
    rows = load_json(os.path.join(work, f"eval-{base_dtype}.json")) or []
    result[f"eval_{base_dtype}"] = rows
    for row in rows:
        m = row.get("metrics") or {}
        if row.get("adapter") is None:
            result[f"bare_{base_dtype}_nll"] = m.get("nll_mean")
        else:
            result[f"nll_{base_dtype}"] = m.get("nll_mean")
            result[f"nll_{base_dtype}_stderr"] = m.get("nll_stderr")
            result["eval_tokens"] = m.get("tokens")
a, b = result.get("nll_bf16"), result.get("nll_nf4")
if a is not None and b is not None and not failed:
    rel = (b - a) / a
    result["rel_diff"] = rel
    result["verdict"] = "PASS" if abs(rel) <= tol else "FAIL"
else:
    result["rel_diff"] = None
    result["verdict"] = "FAIL (incomplete run)"

fmt = lambda v, spec=".4f": "-" if v is None else format(v, spec)
lines.append("QLoRA NLL check: LoRA on an NF4 base against the same LoRA on a bf16 base")
lines.append(f"held-out text: {work}/tldr-dataset, val split, {result.get('eval_tokens')} tokens scored")
lines.append("")
lines.append(f"{'run':<10} {'first loss':>10} {'last loss':>10} {'at step':>8} {'val loss':>9} {'tokens/s':>10}")
for name, s in result["runs"].items():
    lines.append(f"{name:<10} {fmt(s['first_loss']):>10} {fmt(s['last_loss']):>10} "
                 f"{fmt(s['last_step'], 'd'):>8} {fmt(s['val_loss']):>9} {fmt(s['mean_tokens_per_sec'], '.0f'):>10}")
lines.append("(loss: the mean of the last logged interval in metrics.jsonl; val loss: the run's last validation)")
lines.append("")
lines.append(f"{'base':<6} {'NLL bare':>9} {'NLL + adapter':>14} {'stderr':>8}")
for d in ("bf16", "nf4"):
    lines.append(f"{d:<6} {fmt(result.get(f'bare_{d}_nll')):>9} {fmt(result.get(f'nll_{d}'), '.6f'):>14} "
                 f"{fmt(result.get(f'nll_{d}_stderr')):>8}")
lines.append("")
rel = result["rel_diff"]
lines.append(f"relative difference (nf4 - bf16) / bf16: {fmt(rel, '+.4%')} (tolerance {tol:.0%}): {result['verdict']}")
if failed:
    lines.append(f"failed commands: {' '.join(failed)} (see the log below)")
text = "\n".join(lines) + "\n"
print(text, end="")
result["metrics"] = runs
with open(os.path.join(out, "qlora-nll.json"), "w") as f:
    json.dump(result, f, indent=1)
with open(os.path.join(out, "qlora-nll.txt"), "w") as f:
    f.write(text + "\n---- log\n")
    f.write(open(os.path.join(work, "log.txt"), errors="replace").read())
PY
[ -z "$failed" ]
