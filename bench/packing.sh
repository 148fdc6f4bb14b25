#!/usr/bin/env bash
# Real (non-pad) tokens/s of JSONL fine-tuning, packed against padded (data.packing).
#
#   bench/packing.sh [BASE_MODEL_DIR] [DEVICE] [STEPS]
#
# Writes 400 JSONL examples of 50 to 2,000 characters of markdown from ../shared/corpus (about
# as many tokens with the tiny fixture's byte-level tokenizer; log-uniform lengths, fixed seed),
# then LoRA-fine-tunes BASE_MODEL_DIR (default: the tiny-llama fixture) at seq_len 2048 with
# packing on and off, and prints the mean tokens/s of the logged steps of each run (metrics.jsonl
# counts real tokens only).
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-tests/fixtures/tiny-llama}
device=${2:-cpu}
steps=${3:-20}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/data"
python3 - "$work/data/train.jsonl" <<'PY'
import json, math, pathlib, random, sys
random.seed(0)
text = "\n".join(p.read_text(errors="ignore")
                 for p in sorted(pathlib.Path("../shared/corpus").rglob("*.md"))[:400])
with open(sys.argv[1], "w") as out:
    for _ in range(400):
        n = int(math.exp(random.uniform(math.log(50), math.log(2000))))
        at = random.randrange(0, len(text) - n)
        out.write(json.dumps({"text": text[at:at + n]}) + "\n")
PY
llmtool=${LLMTOOL:-target/release/llmtool}
[ -x "$llmtool" ] || cargo build --release ${CARGO_FEATURES:+--features $CARGO_FEATURES}
for packing in true false; do
  cat > "$work/ft.yaml" <<YAML
model:
  pretrained: $base
data:
  roots: [$work/data]
  val_fraction: 0.0
  packing: $packing
training:
  seq_len: 2048
  batch_size: 4
  max_steps: $steps
  warmup_steps: 1
  log_every: 1
  eval_every: 100000
  save_every: 100000
lora:
  r: 8
  alpha: 16
output:
  dir: $work/run-$packing
YAML
  "$llmtool" finetune "$work/ft.yaml" --lora --device "$device" >/dev/null 2>&1
  python3 - "$work/run-$packing/metrics.jsonl" "$packing" <<'PY'
import json, sys
rates = [r["tokens_per_sec"] for r in map(json.loads, open(sys.argv[1])) if r.get("tokens_per_sec")]
rates = rates[1:] or rates  # the first step warms up
print(f"packing={sys.argv[2]:5}  real tokens/s {sum(rates) / len(rates):10.0f}  ({len(rates)} steps)")
PY
done
