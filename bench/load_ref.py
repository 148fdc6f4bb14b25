"""Time transformers loading a model directory in f32 on the CPU, as `llmtool eval` loads it
(docs/benchmarks.md, "Loading a model"):

    python bench/load_ref.py MODEL_DIR
"""
import sys, time, torch, transformers
t = time.perf_counter()
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print(f"transformers from_pretrained: {time.perf_counter() - t:.2f} s")
