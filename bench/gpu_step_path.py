"""What each kernel adds to a step's time, from a bench/gpu_trace.c timeline.

    python3 bench/gpu_step_path.py trace.tsv[.xz] gemv_rms_maxima       # the last 200 steps
    python3 bench/gpu_step_path.py trace.tsv[.xz] gemv_rms_maxima 50    # the last 50

(For a greedy decode row, gemv_rms_maxima, the head's product, ends each step of the captured
graph; the op-by-op run the bench compares it with afterwards takes other kernels, so its
steps are not counted. argmax_finish ends the steps of both.)

Steps are the kernels between consecutive kernels named like the marker (each step ends with
one). Under programmatic launches a kernel starts before the one ahead of it ends and waits,
so its own duration overstates its cost; what it adds to the step is the time from the end
of the kernel ahead to its own end. Per kernel name: launches a step, mean duration, mean gap
from the kernel ahead's end to its start (negative: it started early), and mean addition to
the step, sorted by the additions' sum, which is the step's span. Then one step's first
kernels with their start and end from the step's start.
"""
import collections
import lzma
import sys


def kernels(path):
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt", errors="replace") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    return sorted((int(r[1]), int(r[2]), r[9]) for r in rows if r[0] == "K")


def main():
    path, marker = sys.argv[1], sys.argv[2]
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    ks = kernels(path)
    ends = [i for i, k in enumerate(ks) if marker in k[2]]
    if len(ends) < 2:
        sys.exit(f"fewer than 2 kernels named like {marker!r}")
    bounds = ends[-(count + 1):]
    # Each step with the kernel ahead of its first (the last step's marker) in front.
    steps = [ks[a:b + 1] for a, b in zip(bounds, bounds[1:])]
    stats = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])  # n, duration, gap, addition
    for step in steps:
        for ahead, (start, end, name) in zip(step, step[1:]):
            s = stats[name]
            s[0] += 1
            s[1] += (end - start) / 1e3
            s[2] += (start - ahead[1]) / 1e3
            s[3] += (end - ahead[1]) / 1e3
    n = len(steps)
    span = sum((s[-1][1] - s[0][1]) / 1e3 for s in steps) / n
    print(f"{n} steps of {len(steps[-1]) - 1} kernels, {span:.1f} us a step")
    print(f"{'kernel':34s} {'a step':>6s} {'us each':>8s} {'gap':>7s} {'adds':>7s} {'adds a step':>11s}")
    for name, (k, dur, gap, add) in sorted(stats.items(), key=lambda kv: -kv[1][3]):
        print(f"{name[:34]:34s} {k / n:6.1f} {dur / k:8.2f} {gap / k:7.2f} {add / k:7.2f} {add / n:11.1f}")
    first = steps[-1][0][1]
    print("one step's first kernels (us from the end of the last step's):")
    for start, end, name in steps[-1][1:13]:
        print(f"  {name[:34]:34s} {(start - first) / 1e3:8.2f} {(end - first) / 1e3:8.2f}")


if __name__ == "__main__":
    main()
