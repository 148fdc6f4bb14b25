#!/usr/bin/env python3
"""The rates a GPU's benchmark rows are held to, measured with PyTorch on the machine that runs
them: its read and copy bandwidth (what a decode step's weight reads are bound by) and its bf16
matrix-multiply rate (the denominator of a training row's MFU, `model_tflops` over it).

    python3 bench/gpu_rates.py [--json rates.json]

Bandwidth: the mean of 20 reductions of a 4 GiB bf16 tensor (read), and of 20 copies of it
(read + write). Matrix rate: bf16 products of 8192 x 8192 by 8192 x 8192 (cuBLAS through
torch.matmul, fp32 accumulation), the best of 5 runs of 20 products each, counted as
2 x 8192^3 FLOPs a product. One line per rate on stdout; --json writes them as one object.
"""
import argparse
import json

import torch


def seconds_each(f, n):
    """Mean seconds of one call of `f` over `n` calls, the device synchronized around them."""
    f()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        f()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n / 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the rates to this file as one JSON object")
    args = parser.parse_args()
    rates = {"device": torch.cuda.get_device_name()}
    x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda").view(torch.bfloat16)
    y = torch.empty_like(x)
    x.normal_()
    t = seconds_each(lambda: x.sum(dtype=torch.float32), 20)
    rates["read_gb_per_s"] = round(x.numel() * 2 / t / 1e9)
    t = seconds_each(lambda: y.copy_(x), 20)
    rates["copy_gb_per_s"] = round(2 * x.numel() * 2 / t / 1e9)
    del x, y
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    best = min(seconds_each(lambda: torch.matmul(a, b, out=c), 20) for _ in range(5))
    rates["bf16_matmul_tflops"] = round(2 * n**3 / best / 1e12, 1)
    print(f"device: {rates['device']}")
    print(f"read bandwidth (sum of 4 GiB bf16): {rates['read_gb_per_s']} GB/s")
    print(f"copy bandwidth (read + write, 4 GiB): {rates['copy_gb_per_s']} GB/s")
    print(f"bf16 matmul rate ({n}^3, best of 5 x 20): {rates['bf16_matmul_tflops']} TFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rates, f)
            f.write("\n")


if __name__ == "__main__":
    main()
