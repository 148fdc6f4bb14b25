"""Two builds' GPU time by kernel name over their last steps, side by side, from bench/gpu_trace.c
timelines (bench/gpu_trace.sh keeps them as TAG-kernels.tsv when run without driver calls).

    python3 bench/kernel_diff.py main.tsv branch.tsv               # last 2 steps, ending with
    python3 bench/kernel_diff.py main.tsv branch.tsv adamw_multi 3 # a kernel named like the marker

Prints each side's summed kernel, copy and memset time a step, then one line per name (time a
step and launches a step on each side, and the change), largest change first: where a change
to the step's kernels gained or lost.
"""
import collections
import sys


def per_step(path, marker, steps):
    activities = []
    for line in open(path, errors="replace"):
        f = line.rstrip("\n").split("\t")
        if f[0] == "K":
            activities.append((int(f[1]), int(f[2]), f[9]))
        elif f[0] == "C":
            activities.append((int(f[1]), int(f[2]), f"[copy kind {f[5]}]"))
        elif f[0] == "S":
            activities.append((int(f[1]), int(f[2]), "[memset]"))
    activities.sort()
    ends = [end for _, end, name in activities if marker in name]
    if len(ends) < steps + 1:
        sys.exit(f"{path}: fewer than {steps + 1} activities named like {marker!r}")
    begin, end = ends[-steps - 1], ends[-1]
    by_name = collections.defaultdict(lambda: [0.0, 0.0])
    for start, stop, name in activities:
        if start >= begin and stop <= end:
            by_name[name][0] += (stop - start) / 1e3 / steps
            by_name[name][1] += 1 / steps
    return by_name


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    marker = argv[2] if len(argv) > 2 else "adamw_multi"
    steps = int(argv[3]) if len(argv) > 3 else 2
    a, b = (per_step(path, marker, steps) for path in argv[:2])

    def total(side):
        return sum(us for us, _ in side.values())

    print(f"a step, us: A {total(a):.1f}, B {total(b):.1f} ({argv[0]} / {argv[1]})")
    print(f"{'A us':>9} {'A n':>5} {'B us':>9} {'B n':>5} {'B - A':>8}  name")

    def change(name):
        return b.get(name, [0, 0])[0] - a.get(name, [0, 0])[0]

    for name in sorted(set(a) | set(b), key=lambda n: -abs(change(n))):
        (ua, na), (ub, nb) = a.get(name, [0, 0]), b.get(name, [0, 0])
        print(f"{ua:9.1f} {na:5.0f} {ub:9.1f} {nb:5.0f} {change(name):+8.1f}  {name[:90]}")


if __name__ == "__main__":
    main(sys.argv[1:])
