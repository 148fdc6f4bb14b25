#!/usr/bin/env bash
# Real (non-pad) tokens/s of JSONL fine-tuning, packed against padded (data.packing).
#
#   [SEQ_LEN=2048] bench/packing.sh [BASE_MODEL_DIR] [DEVICE] [STEPS]
#
# Writes 400 JSONL examples of SEQ_LEN/40 to SEQ_LEN·0.98 characters of markdown from
# ../shared/corpus (50 to 2,000 at SEQ_LEN 2048; log-uniform lengths, fixed seed), then
# LoRA-fine-tunes BASE_MODEL_DIR (default: the tiny-llama fixture, whose 128 positions need
# SEQ_LEN=128) at seq_len SEQ_LEN with packing on and off, and prints the mean tokens/s of the
# logged steps of each run (metrics.jsonl counts real tokens only).
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-tests/fixtures/tiny-llama}
device=${2:-cpu}
steps=${3:-20}
seq_len=${SEQ_LEN:-2048}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/data"
python3 - "$work/data/train.jsonl" "$seq_len" <<'PY'
import json, math, pathlib, random, sys
random.seed(0)
seq_len = int(sys.argv[2])
text = "\n".join(p.read_text(errors="ignore")
                 for p in sorted(pathlib.Path("../shared/corpus").rglob("*.md"))[:400])
with open(sys.argv[1], "w") as out:
    for _ in range(400):
        n = int(math.exp(random.uniform(math.log(seq_len / 40), math.log(seq_len * 0.98))))
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
  seq_len: $seq_len
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
  "$llmtool" finetune "$work/ft.yaml" --lora --device "$device" >"$work/log-$packing" 2>&1 || { cat "$work/log-$packing"; exit 1; }
  python3 - "$work/run-$packing/metrics.jsonl" "$packing" <<'PY'
import json, sys
rates = [r["tokens_per_sec"] for r in map(json.loads, open(sys.argv[1])) if r.get("tokens_per_sec")]
rates = rates[1:] or rates  # the first step warms up
print(f"packing={sys.argv[2]:5}  real tokens/s {sum(rates) / len(rates):10.0f}  ({len(rates)} steps)")
PY
done
