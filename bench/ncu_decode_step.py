"""One decode step's kernels from an ncu CSV (bench/gpu_decode.sh): finds the period of the
kernel sequence (one step), then sums each kernel's duration and DRAM bytes read over one step.

    python3 bench/ncu_decode_step.py ncu-1b.csv

ncu times each kernel alone with its caches flushed, so the sum is not the step's wall time (no
launch gaps, no overlap), but it says where a step's time goes and how close each kernel gets
to the memory bandwidth.
"""
import collections
import csv
import sys


def main(path):
    kernels = collections.defaultdict(dict)
    lines = open(path).read().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    for r in csv.DictReader(lines[header:]):
        k = kernels[int(r["ID"])]
        k["name"], k["grid"], k["block"] = r["Kernel Name"], r["Grid Size"], r["Block Size"]
        k[r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
    ids = sorted(kernels)
    names = [kernels[i]["name"] for i in ids]
    period = next(p for p in range(1, len(names))
                  if all(names[i] == names[i + p] for i in range(len(names) - p)))
    if 100 + period > len(ids):
        sys.exit(f"{path}: too few launches for a step of {period} kernels")
    step = ids[100:100 + period]
    total_ns = sum(kernels[i]["gpu__time_duration.sum"] for i in step)
    total_bytes = sum(kernels[i]["dram__bytes_read.sum"] for i in step)
    print(f"{period} kernels a step; durations sum to {total_ns / 1e3:.1f} us, "
          f"{total_bytes / 1e6:.1f} MB read, {total_bytes / total_ns:.0f} GB/s")
    rows = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for i in step:
        k = kernels[i]
        row = rows[(k["name"], k["grid"], k["block"])]
        row[0] += 1
        row[1] += k["gpu__time_duration.sum"]
        row[2] += k["dram__bytes_read.sum"]
    print(f"{'kernel':32s} {'grid':>14s} {'block':>14s} {'n':>4s} {'us':>9s} "
          f"{'us each':>8s} {'MB each':>8s} {'GB/s':>6s}")
    for (name, grid, block), (n, ns, b) in sorted(rows.items(), key=lambda x: -x[1][1]):
        print(f"{name[:32]:32s} {grid:>14s} {block:>14s} {n:4d} {ns / 1e3:9.1f} "
              f"{ns / n / 1e3:8.2f} {b / n / 1e6:8.2f} {b / ns:6.0f}")


if __name__ == "__main__":
    main(sys.argv[1])
