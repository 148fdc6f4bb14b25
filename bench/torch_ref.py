#!/usr/bin/env python3
"""PyTorch reference for `llmtool bench`: the same rows, measured with PyTorch + transformers
(`LlamaForCausalLM`, SDPA attention, eager unless the mode says `compile`) + PEFT.

Every row is one (task, preset, mode) with random weights and random tokens, timed after
warm-up steps with the device synchronized around the timed steps, so rows of the two tools
join on (task, preset, mode). Needs torch, transformers and peft; downloads nothing.

    python bench/torch_ref.py --device cpu --sizes tiny --batch 8 --seq 256 --steps 3
    python bench/torch_ref.py --device cuda --sizes tiny,small,base --out torch.jsonl
    python bench/torch_ref.py --device cuda --sizes 1b,8b --tasks lora --modes bf16,bf16+ckpt \\
        --batch 4 --seq 2048 --lora-targets all --rank 16 --lora-base-dtype bf16   # or nf4
    torchrun --nproc-per-node 8 bench/torch_ref.py --device cuda --sizes 1b --tasks train,lora

Under torchrun (WORLD_SIZE > 1) the train and lora rows run data parallel, as `llmtool bench
--gpus N` does: DistributedDataParallel (its default 25 MB buckets) over NCCL on GPUs (rank r
on cuda:LOCAL_RANK) or gloo on the CPU, each rank on its own random batch of --batch
sequences; rank 0 prints the rows, with `ranks` and the tokens of all ranks in tokens_per_s.

Presets (hidden, layers, heads, kv heads, ffn, vocab; head dim = hidden / heads):
  tiny   384,  6,  6,  6,  1024,   8192  tied embeddings (~14M parameters)
  small  512, 12,  8,  8,  1408,  16384  tied (~47M)
  base   768, 12, 12, 12,  2048,  32000  tied (~110M)
  1b    2048, 16, 32,  8,  8192, 128256  tied, rope_theta 500000 (Llama-3.2-1B shapes)
  8b    4096, 32, 32,  8, 14336, 128256  untied, rope_theta 500000 (Llama-3.1-8B shapes)
(1b/8b: the llama3 RoPE frequency scaling is left out; it changes no shape or cost.)

Tasks:
  train     full training step: forward, loss, backward, clip to norm 1, AdamW (lr 3e-4,
            weight decay 0.1), zero grads.
  lora      PEFT LoRA (rank --rank, alpha 2 x rank, dropout --lora-dropout, default none, on
            --lora-targets) over a frozen base; same step without clipping, AdamW lr 1e-4 on
            the adapter only.
  eval      forward and loss under torch.no_grad().
  prefill   batch 1, a --seq-token random prompt into a fresh KV cache under no_grad, the
            last position's logits only (logits_to_keep=1), as generation starts.
  generate  batch 1, a 16-token random prompt, greedy `model.generate` of exactly
            --gen-tokens new tokens (prompt included in the time); runs steps/4 times (at
            least once) after one untimed run. With --temperature T (and --top-p P) it
            samples (`do_sample=True`), as llmtool bench's generate rows with the same flags;
            --samples N then draws N samples of the prompt as one batch
            (`num_return_sequences=N`; tokens/s counts every sample's tokens).

Modes: fp32 | bf16 | fp32+ckpt | bf16+ckpt | bf16+compile | fp32+compile.
  bf16     autocast to bfloat16 over fp32 weights (mixed precision), except prefill and
           generate, whose model is converted to bfloat16.
  ckpt     gradient checkpointing (train and lora only; eval/prefill/generate rows are skipped).
  compile  torch.compile of the model (train only; other tasks' rows are skipped).
  --lora-base-dtype bf16 stores the frozen base of lora rows in bfloat16 (adapters stay fp32);
  nf4 is QLoRA: the blocks' linear layers become bitsandbytes Linear4bit (NF4, double
  quantization, bf16 compute), the rest bf16, prepared by PEFT's prepare_model_for_kbit_training
  (needs bitsandbytes). The base is built on the host and quantized as it moves to the device
  (as transformers' loader does); the peak counters restart once it is there.
Default modes: fp32 on CPU; fp32,bf16,bf16+ckpt on GPUs (as llmtool bench).

JSON fields of a row (one line per row on stdout, appended to --out):
  tool "pytorch"; task, preset, mode; batch, seq (train, lora, eval)
  params          train: parameters (tied embedding counted once)
  trainable       lora: adapter parameters; also rank, alpha, lora_targets, base_dtype
  step_ms         mean milliseconds per timed step (train, lora, eval, prefill)
  prompt_tokens   prefill: the prompt's length (--seq)
  ms, new_tokens  generate: mean milliseconds per whole generate call, tokens it made
  tokens_per_s    batch x seq / step time (generate: new_tokens / ms)
  model_tflops    train: 6 x params x tokens/s; lora: (4 x base params + 6 x trainable) x
                  tokens/s (forward and input gradients of the base, all of the adapter);
                  prefill: the FLOPs of prefill_flops() per second (head on one position);
                  recomputation under checkpointing is not counted (model FLOPs, for MFU)
  peak_mb         CUDA: torch.cuda.max_memory_allocated since the row began (what the
                  allocator handed out; llmtool's peak_mb is its pool's high-water mark).
                  CPU: the process's peak resident set (ru_maxrss), monotonic over one run:
                  run one row per process for per-row CPU peaks.
  peak_smi_mb     CUDA only: device memory in use as nvidia-smi shows it, CUDA context,
                  cuBLAS workspaces and the allocator's cache included: total - free
                  (torch.cuda.mem_get_info) at the end of the row, plus any reserved memory
                  released during it. Device-wide: other processes on the GPU count too.
  error           instead of the measurement, when the row failed (e.g. out of memory)
"""
import argparse
import gc
import json
import os
import resource
import time
import warnings

import torch

# name: (hidden, layers, heads, kv_heads, ffn, vocab, tied, rope_theta)
PRESETS = {
    "tiny": (384, 6, 6, 6, 1024, 8192, True, 10000.0),
    "small": (512, 12, 8, 8, 1408, 16384, True, 10000.0),
    "base": (768, 12, 12, 12, 2048, 32000, True, 10000.0),
    "1b": (2048, 16, 32, 8, 8192, 128256, True, 500000.0),
    "8b": (4096, 32, 32, 8, 14336, 128256, False, 500000.0),
}
TASKS = ("train", "lora", "eval", "prefill", "generate")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT_TOKENS = 16
# PEFT asks transformers a deprecated question on every lora row; the answer is still right.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# ---------------------------------------------------------------- model, timing, memory


def build_model(preset, seq, device, dtype=torch.float32):
    """A randomly initialized LlamaForCausalLM of `preset`, built on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h, layers, heads, kv, ffn, vocab, tied, theta = PRESETS[preset]
    cfg = LlamaConfig(
        hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab,
        max_position_embeddings=max(seq, 2048), tie_word_embeddings=tied, rope_theta=theta,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    # Built in place and in its storage dtype: an fp32 copy on the way would count in the
    # row's peak memory (32 GB for 8b), and initializing 8b on a CPU takes minutes.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model


def random_tokens(preset, shape, device):
    if RANKS > 1:
        torch.manual_seed(1 + RANK)  # each rank its own batch
    return torch.randint(0, PRESETS[preset][5], shape, device=device)


# torchrun's world: this process's rank and the number of ranks (1 without torchrun).
RANK = int(os.environ.get("RANK", "0"))
RANKS = int(os.environ.get("WORLD_SIZE", "1"))


def join_ranks(a):
    """Under torchrun: the process group (NCCL on GPUs, gloo on the CPU) and this rank's GPU."""
    if RANKS == 1:
        return
    import torch.distributed as dist

    if not set(a.tasks) <= {"train", "lora"}:
        raise SystemExit("under torchrun only the train and lora rows run: --tasks train,lora")
    if a.device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        a.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if a.device.startswith("cuda") else "gloo")


def data_parallel(model, a):
    """`model` in DistributedDataParallel (default buckets) when there are several ranks."""
    if RANKS == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(a.device).index] if a.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


def checkpointing(model):
    """Gradient checkpointing; non-reentrant under DDP, which the reentrant kind trips up."""
    kwargs = {"use_reentrant": False} if RANKS > 1 else None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, steps, warmup, device):
    """Mean seconds per call of `fn` over `steps` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def start_row(device):
    """Frees what earlier rows left and restarts the peak counters."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_fields(device):
    """peak_mb (and on CUDA peak_smi_mb) of the row so far; call before its model is freed."""
    mib = 2**20
    if not device.startswith("cuda"):
        # Linux reports ru_maxrss in KiB.
        return dict(peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    free, total = torch.cuda.mem_get_info()
    released = torch.cuda.max_memory_reserved() - torch.cuda.memory_reserved()
    return dict(peak_mb=torch.cuda.max_memory_allocated() / mib,
                peak_smi_mb=(total - free + released) / mib)


def autocast(device, mode):
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled="bf16" in mode)


# ---------------------------------------------------------------- one function per task


def bench_train(a, preset, mode):
    model = build_model(preset, a.seq, a.device)
    if "ckpt" in mode:
        checkpointing(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    x = random_tokens(preset, (a.batch, a.seq), a.device)
    shared = data_parallel(model, a)
    forward = torch.compile(shared) if "compile" in mode else shared

    def step():
        with autocast(a.device, mode):
            loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timed(step, a.steps, a.warmup, a.device)
    params = sum(p.numel() for p in model.parameters())
    tok = RANKS * a.batch * a.seq / dt
    return dict(params=params, batch=a.batch, seq=a.seq, step_ms=dt * 1e3, tokens_per_s=tok,
                model_tflops=6 * params * tok / 1e12, **peak_fields(a.device))


def quantize_blocks(model, device):
    """QLoRA's base: every linear layer of the blocks as a bitsandbytes NF4 Linear4bit with
    double quantization and bf16 compute, quantized as it moves to `device`; then the rest of
    the model moves there too."""
    import bitsandbytes as bnb

    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features,
                                      bias=linear.bias is not None, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
                setattr(parent, name, q.to(device))
    return model.to(device)


def bench_lora(a, preset, mode):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    base_dtype = torch.float32 if a.lora_base_dtype == "fp32" else torch.bfloat16
    # A 4-bit base is built on the host and quantized onto the device, as transformers' loader
    # does: the device never holds the 16-bit projections.
    nf4 = a.lora_base_dtype == "nf4"
    model = build_model(preset, a.seq, "cpu" if nf4 else a.device, base_dtype)
    if nf4:
        model = quantize_blocks(model, a.device)
        # What transformers' 4-bit loader sets: PEFT prepares (and checkpoints) only such models.
        model.is_loaded_in_4bit = True
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing="ckpt" in mode)
        assert model.is_gradient_checkpointing == ("ckpt" in mode)
        start_row(a.device)
    elif "ckpt" in mode:
        checkpointing(model)
        model.enable_input_require_grads()
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=a.lora_dropout,
                     target_modules=list(a.lora_targets), task_type="CAUSAL_LM")
    # PEFT freezes the base and keeps the adapter in fp32 over a bf16 base.
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = random_tokens(preset, (a.batch, a.seq), a.device)
    shared = data_parallel(model, a)

    def step():
        with autocast(a.device, mode):
            loss = shared(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timed(step, a.steps, a.warmup, a.device)
    trainable = sum(p.numel() for p in params)
    # A 4-bit parameter's numel counts packed bytes; its quant state has the real shape.
    state = lambda p: getattr(p, "quant_state", None)
    base = sum(state(p).shape.numel() if state(p) else p.numel()
               for p in model.parameters()) - trainable
    tok = RANKS * a.batch * a.seq / dt
    # lora_dropout is named only where drawn, as llmtool bench's rows.
    dropout = dict(lora_dropout=a.lora_dropout) if a.lora_dropout > 0 else {}
    return dict(trainable=trainable, rank=a.rank, alpha=2 * a.rank,
                lora_targets=",".join(a.lora_targets), base_dtype=a.lora_base_dtype,
                batch=a.batch, seq=a.seq, step_ms=dt * 1e3, tokens_per_s=tok,
                model_tflops=(4 * base + 6 * trainable) * tok / 1e12, **dropout,
                **peak_fields(a.device))


@torch.no_grad()
def bench_eval(a, preset, mode):
    model = build_model(preset, a.seq, a.device).eval()
    x = random_tokens(preset, (a.batch, a.seq), a.device)

    def step():
        with autocast(a.device, mode):
            model(input_ids=x, labels=x).loss.item()

    dt = timed(step, a.steps, a.warmup, a.device)
    return dict(batch=a.batch, seq=a.seq, step_ms=dt * 1e3,
                tokens_per_s=a.batch * a.seq / dt, **peak_fields(a.device))


@torch.no_grad()
def bench_generate(a, preset, mode):
    dtype = torch.bfloat16 if "bf16" in mode else torch.float32
    model = build_model(preset, a.seq, a.device, dtype).eval()
    prompt = random_tokens(preset, (1, PROMPT_TOKENS), a.device)
    new = a.gen_tokens

    sampling = dict(do_sample=False)
    if a.temperature > 0:
        sampling = dict(do_sample=True, temperature=a.temperature, top_p=a.top_p or 1.0, top_k=0,
                        num_return_sequences=a.samples)

    def run():
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                       **sampling)

    dt = timed(run, max(1, a.steps // 4), 1, a.device)
    samples = a.samples if a.temperature > 0 else 1
    row = dict(new_tokens=new, ms=dt * 1e3, tokens_per_s=samples * new / dt,
               **peak_fields(a.device))
    if a.temperature > 0:
        row.update(temperature=a.temperature, top_p=a.top_p)
    if samples > 1:
        row.update(samples=samples)
    return row


@torch.no_grad()
def bench_prefill(a, preset, mode):
    dtype = torch.bfloat16 if "bf16" in mode else torch.float32
    model = build_model(preset, a.seq, a.device, dtype).eval()
    prompt = random_tokens(preset, (1, a.seq), a.device)

    def step():
        # A fresh cache each call, the last position's logits only, as generate's first step.
        model(input_ids=prompt, use_cache=True, logits_to_keep=1).logits.float().sum().item()

    dt = timed(step, a.steps, a.warmup, a.device)
    return dict(prompt_tokens=a.seq, step_ms=dt * 1e3, tokens_per_s=a.seq / dt,
                model_tflops=prefill_flops(preset, a.seq) / dt / 1e12, **peak_fields(a.device))


def prefill_flops(preset, n):
    """Model FLOPs of an n-token prefill: every block projection on every token, the head on
    the last one, causal attention's two products (2 x layers x hidden x n^2)."""
    h, layers, heads, kv, ffn, vocab, _, _ = PRESETS[preset]
    kv_width = h // heads * kv
    projections = layers * (h * h * 2 + 2 * h * kv_width + 3 * h * ffn)
    return 2 * projections * n + 2 * vocab * h + 2 * layers * h * n * n


BENCH = dict(train=bench_train, lora=bench_lora, eval=bench_eval, prefill=bench_prefill,
             generate=bench_generate)


# ---------------------------------------------------------------- command line


def comma_list(allowed, what):
    def parse(text):
        items = [s for s in text.split(",") if s]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {','.join(bad) or text!r}: expected {', '.join(allowed)}")
        return items
    return parse


def parse_modes(text):
    modes = [m for m in text.split(",") if m]
    for m in modes:
        dtype, *flags = m.split("+")
        if dtype not in ("fp32", "bf16") or any(f not in ("ckpt", "compile") for f in flags) \
                or len(flags) > 1:
            raise argparse.ArgumentTypeError(
                f"unknown mode {m!r}: expected fp32, bf16, fp32+ckpt, bf16+ckpt or bf16+compile")
    return modes


def parse_targets(text):
    names = [t for t in text.split(",") if t]
    if names in (["all"], ["all-linear"]):
        return list(LINEARS)
    short = {n.split("_")[0]: n for n in LINEARS}
    out = []
    for n in names:
        long = short.get(n, n)
        if long not in LINEARS:
            raise argparse.ArgumentTypeError(
                f"unknown LoRA target {n!r}: expected {', '.join(LINEARS)} or all")
        if long not in out:
            out.append(long)
    return out


def positive(text):
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Row fields and modes: see the docstring at the top.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--sizes", type=comma_list(tuple(PRESETS), "preset"), default="tiny,small",
                   help="comma list of presets: " + ", ".join(PRESETS))
    p.add_argument("--tasks", type=comma_list(TASKS, "task"),
                   default="train,lora,eval,prefill,generate")
    p.add_argument("--modes", type=parse_modes, default=None,
                   help="comma list [default: fp32 on CPU, fp32,bf16,bf16+ckpt on GPUs]")
    p.add_argument("--batch", type=positive, default=16, help="sequences per step")
    p.add_argument("--seq", type=positive, default=512, help="tokens per sequence")
    p.add_argument("--steps", type=positive, default=20,
                   help="timed steps per row (generate: steps/4 runs, at least one)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--gen-tokens", type=positive, default=256, help="new tokens per generate run")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="generate rows sample at this temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=None, help="with --temperature: nucleus mass")
    p.add_argument("--samples", type=positive, default=1,
                   help="with --temperature: generate rows draw this many samples as one batch")
    p.add_argument("--lora-targets", type=parse_targets, default="q_proj,k_proj,v_proj,o_proj",
                   help="comma list of projections the lora task adapts, or all (every linear "
                        "layer of the blocks)")
    p.add_argument("--rank", type=positive, default=8, help="LoRA rank (alpha is 2 x rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="lora rows: dropout on the adapter input (PEFT's lora_dropout)")
    p.add_argument("--lora-base-dtype", choices=("fp32", "bf16", "nf4"), default="fp32",
                   help="storage of the lora task's frozen base (nf4: QLoRA, needs bitsandbytes)")
    p.add_argument("--out", default=None, metavar="FILE", help="also append each row to FILE")
    a = p.parse_args(argv)
    if a.samples > 1 and a.temperature <= 0:
        p.error("--samples needs --temperature (llmtool bench refuses it the same way)")
    if a.modes is None:
        a.modes = ["fp32"] if a.device == "cpu" else ["fp32", "bf16", "bf16+ckpt"]
    return a


def runs(a):
    """The (preset, task, mode) rows to measure, in llmtool bench's order."""
    for preset in a.sizes:
        for task in a.tasks:
            for mode in a.modes:
                if task in ("eval", "prefill", "generate") and "ckpt" in mode:
                    continue
                if task != "train" and "compile" in mode:
                    continue
                yield preset, task, mode


def measure(a, preset, task, mode):
    start_row(a.device)
    row = dict(tool="pytorch", task=task, preset=preset, mode=mode)
    if RANKS > 1:
        row["ranks"] = RANKS
    try:
        row.update(BENCH[task](a, preset, mode))
    except Exception as e:  # report it and go on with the next row
        row["error"] = repr(e)[:300]
    if "compile" in mode:
        torch._dynamo.reset()  # drop the compiled graphs, which hold the model
    return row


def print_table(rows):
    print(f"{'task':9} {'preset':6} {'mode':14} {'tok/s':>12} {'step_ms':>9} {'peak_MB':>9}"
          f" {'smi_MB':>9}")
    for r in rows:
        head = f"{r['task']:9} {r['preset']:6} {r['mode']:14}"
        if "error" in r:
            print(f"{head} ERROR {r['error'][:60]}")
            continue
        ms = r.get("step_ms", r.get("ms", 0))
        smi = f"{r['peak_smi_mb']:9.0f}" if "peak_smi_mb" in r else f"{'-':>9}"
        print(f"{head} {r['tokens_per_s']:12.0f} {ms:9.2f} {r.get('peak_mb', 0):9.0f} {smi}")


def main():
    a = parse_args()
    join_ranks(a)
    import peft
    import transformers

    where = (torch.cuda.get_device_name(torch.device(a.device)) if a.device.startswith("cuda")
             else f"threads {torch.get_num_threads()}")
    ranks = f" ranks {RANKS}" if RANKS > 1 else ""
    report = RANK == 0  # every rank measures; rank 0 reports
    if report:
        print(f"torch {torch.__version__} transformers {transformers.__version__} "
              f"peft {peft.__version__} device {a.device} {where}{ranks}", flush=True)
    rows = []
    for preset, task, mode in runs(a):
        row = measure(a, preset, task, mode)
        rows.append(row)
        if not report:
            continue
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    if report:
        print_table(rows)
    if RANKS > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
