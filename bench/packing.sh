#!/usr/bin/env bash
# Real (non-pad) tokens/s of JSONL fine-tuning, packed against padded (data.packing).
#
#   [SEQ_LEN=2048] [DTYPE=f32] [CORPUS=../shared/corpus] bench/packing.sh [BASE_MODEL_DIR] [DEVICE] [STEPS]
#
# Writes 400 JSONL examples of markdown from CORPUS whose lengths in tokens of the base's own
# tokenizer (BASE_MODEL_DIR/tokenizer.json) are log-uniform from SEQ_LEN/40 to SEQ_LEN·0.98
# (50 to 2,007 tokens at SEQ_LEN 2048; fixed seed), then LoRA-fine-tunes BASE_MODEL_DIR
# (default: the tiny-llama fixture, whose 128 positions need SEQ_LEN=128; r 16 on every linear
# layer, batch 4, training.dtype DTYPE) at seq_len SEQ_LEN with packing on and off, and prints
# the mean tokens/s of the logged steps of each run after the first (metrics.jsonl counts real
# tokens only). Needs python3 with the `tokenizers` package (transformers brings it).
#
# BASE_MODEL_DIR=random-1b (with python3 and transformers) first writes a model dir of
# Llama-3.2-1B's shape with random bf16 weights and the tiny-llama fixture's tokenizer (a
# model may have more embeddings than its tokenizer has tokens) into a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-tests/fixtures/tiny-llama}
device=${2:-cpu}
steps=${3:-20}
seq_len=${SEQ_LEN:-2048}
dtype=${DTYPE:-f32}
corpus=${CORPUS:-../shared/corpus}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ "$base" = random-1b ]; then
  base=$work/random-1b
  python3 - "$base" tests/fixtures/tiny-llama <<'PY'
import shutil, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
out, fixture = sys.argv[1], sys.argv[2]
cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                  max_position_embeddings=131072, tie_word_embeddings=True, rope_theta=500000.0,
                  bos_token_id=0, eos_token_id=0)
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
LlamaForCausalLM(cfg).save_pretrained(out)
for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f"{fixture}/{name}", out)
PY
fi
mkdir -p "$work/data"
python3 - "$work/data/train.jsonl" "$seq_len" "$base/tokenizer.json" "$corpus" <<'PY'
import json, math, pathlib, random, sys
from tokenizers import Tokenizer
random.seed(0)
out, seq_len, tokenizer, corpus = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
files = sorted(pathlib.Path(corpus).rglob("*.md"))[:400]
if not files:
    sys.exit(f"no markdown under {corpus}")
text = "\n".join(p.read_text(errors="ignore") for p in files)
offsets = Tokenizer.from_file(tokenizer).encode(text, add_special_tokens=False).offsets
with open(out, "w") as f:
    for _ in range(400):
        n = int(math.exp(random.uniform(math.log(seq_len / 40), math.log(seq_len * 0.98))))
        at = random.randrange(0, len(offsets) - n)
        f.write(json.dumps({"text": text[offsets[at][0]:offsets[at + n - 1][1]]}) + "\n")
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
  dtype: $dtype
lora:
  r: 16
  alpha: 32
  dropout: 0.0
  target_modules: [all-linear]
output:
  dir: $work/run-$packing
YAML
  "$llmtool" finetune "$work/ft.yaml" --lora --device "$device" >"$work/log-$packing" 2>&1 || { cat "$work/log-$packing"; exit 1; }
  python3 - "$work/run-$packing/metrics.jsonl" "$packing" <<'PY'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if r.get("tokens_per_sec")]
rates = [r["tokens_per_sec"] for r in rows][1:] or [rows[0]["tokens_per_sec"]]  # first warms up
print(f"packing={sys.argv[2]:5}  real tokens/s {sum(rates) / len(rates):10.0f}  ({len(rates)} steps)")
PY
done
