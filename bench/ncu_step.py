"""One step's kernels from an ncu CSV: finds the kernel sequence of one step, then sums each
kernel's duration and DRAM bytes read over that step.

    python3 bench/ncu_step.py ncu-1b.csv            # a decode loop (bench/gpu_decode.sh)
    python3 bench/ncu_step.py --last ncu-lora.csv   # training steps (bench/gpu_profile_step.sh)
    python3 bench/ncu_step.py --last=adamw ncu-lora.csv

A decode capture starts inside the loop: the step is the shortest period of the whole sequence.
A training capture holds the setup and two or more identical steps: with --last the step is
the longest tail that repeats the same number of launches before it; with --last=NAME it is
the launches after the second-to-last kernel whose name contains NAME, through the last one
(for steps that differ, e.g. a first step that casts more; an optimizer kernel ends a step).

ncu times each kernel alone, so the sum is not the step's wall time (no launch gaps, no
overlap), but it says where a step's time goes and how close each kernel gets to the memory
bandwidth.
"""
import collections
import csv
import sys


def read_kernels(path):
    kernels = collections.defaultdict(dict)
    lines = open(path).read().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    for r in csv.DictReader(lines[header:]):
        k = kernels[int(r["ID"])]
        k["name"], k["grid"], k["block"] = r["Kernel Name"], r["Grid Size"], r["Block Size"]
        k[r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
    return [kernels[i] for i in sorted(kernels)]


def decode_step(path, kernels):
    names = [k["name"] for k in kernels]
    period = next(p for p in range(1, len(names))
                  if all(names[i] == names[i + p] for i in range(len(names) - p)))
    if 100 + period > len(kernels):
        sys.exit(f"{path}: too few launches for a step of {period} kernels")
    return kernels[100:100 + period]


def last_step(path, kernels, marker=None):
    names = [k["name"] for k in kernels]
    if marker:
        ends = [i for i, name in enumerate(names) if marker in name]
        if len(ends) < 2:
            sys.exit(f"{path}: fewer than two launches of a kernel named like {marker!r}")
        return kernels[ends[-2] + 1:ends[-1] + 1]
    period = next((p for p in range(len(names) // 2, 0, -1)
                   if names[-2 * p:-p] == names[-p:]), None)
    if period is None:
        sys.exit(f"{path}: the last launches do not repeat; capture at least two equal steps")
    return kernels[-period:]


def main(argv):
    flags = [a for a in argv if a.startswith("--last")]
    path = [a for a in argv if not a.startswith("--last")][0]
    last = bool(flags)
    marker = flags[0].partition("=")[2] if flags else None
    kernels = read_kernels(path)
    step = last_step(path, kernels, marker) if last else decode_step(path, kernels)
    total_ns = sum(k["gpu__time_duration.sum"] for k in step)
    total_bytes = sum(k["dram__bytes_read.sum"] for k in step)
    print(f"{len(step)} kernels a step; durations sum to {total_ns / 1e3:.1f} us, "
          f"{total_bytes / 1e6:.1f} MB read, {total_bytes / total_ns:.0f} GB/s")
    for key in ((lambda k: (k["name"], "", "")) if last else None,
                lambda k: (k["name"], k["grid"], k["block"])):
        if key:
            print_table(step, key, total_ns)


def print_table(step, key, total_ns):
    """One line per kernel (and launch shape, where `key` includes it), longest total first."""
    rows = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for k in step:
        row = rows[key(k)]
        row[0] += 1
        row[1] += k["gpu__time_duration.sum"]
        row[2] += k["dram__bytes_read.sum"]
    print(f"\n{'kernel':48s} {'grid':>14s} {'block':>14s} {'n':>5s} {'us':>9s} "
          f"{'us each':>8s} {'MB each':>8s} {'GB/s':>6s} {'share':>6s}")
    for (name, grid, block), (n, ns, b) in sorted(rows.items(), key=lambda x: -x[1][1]):
        print(f"{name[:48]:48s} {grid:>14s} {block:>14s} {n:5d} {ns / 1e3:9.1f} "
              f"{ns / n / 1e3:8.2f} {b / n / 1e6:8.2f} {b / ns:6.0f} {ns / total_ns:6.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
