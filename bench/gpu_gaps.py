"""Where the GPU sat idle during a program's last steps, from a bench/gpu_trace.c timeline.

    python3 bench/gpu_gaps.py trace.tsv adamw_multi       # the last 2 steps, each ending
    python3 bench/gpu_gaps.py trace.tsv adamw_multi 3     # with a kernel named like adamw_multi
    python3 bench/gpu_gaps.py trace.tsv argmax_finish 6 266   # ending 266 markers before the last

The window runs from the end of the (N+1)-th last kernel named like the marker to the end of
the last one; with a fourth argument, the window ends that many markers before the last (to
read a run that an op-by-op run follows). Its wall time splits into GPU work (the union of kernels, copies and memsets)
and idle gaps. A gap whose next kernel was launched by the host only after the GPU had gone
idle is the host's (host-bound: the GPU waited for the launch); the driver calls the host
made during it are summed by name, and the rest of its time is the program's own host code.
A gap whose next launch was already queued is the GPU's own latency between kernels.
Without driver calls in the trace (LLMTOOL_TRACE_NO_API) every gap is reported unattributed.
"""
import bisect
import collections
import sys


def read(path):
    gpu, calls, syncs = [], [], []
    for line in open(path, errors="replace"):
        f = line.rstrip("\n").split("\t")
        if f[0] == "K":
            gpu.append((int(f[1]), int(f[2]), int(f[3]), f[9]))
        elif f[0] == "C":
            gpu.append((int(f[1]), int(f[2]), int(f[3]), f"[copy kind {f[5]}, {f[4]} B]"))
        elif f[0] == "S":
            gpu.append((int(f[1]), int(f[2]), int(f[3]), f"[memset {f[4]} B]"))
        elif f[0] == "A":
            calls.append((int(f[1]), int(f[2]), int(f[3]), f[6]))
        elif f[0] == "Y":
            syncs.append((int(f[1]), int(f[2]), int(f[4])))
    gpu.sort()
    calls.sort()
    return gpu, calls, syncs


def window(gpu, marker, steps, skip=0):
    ends = [a[1] for a in gpu if marker in a[3]]
    ends = ends[: len(ends) - skip]
    if len(ends) < steps + 1:
        sys.exit(f"fewer than {steps + 1} activities named like {marker!r}")
    return ends[-steps - 1], ends[-1]


def short(name, width=60):
    return name if len(name) <= width else name[: width - 3] + "..."


def main(argv):
    path, marker = argv[0], argv[1]
    steps = int(argv[2]) if len(argv) > 2 else 2
    skip = int(argv[3]) if len(argv) > 3 else 0
    gpu, calls, syncs = read(path)
    begin, end = window(gpu, marker, steps, skip)
    launches = {c[2]: c for c in calls if "Launch" in c[3] or "Memcpy" in c[3] or "Memset" in c[3]}
    call_starts = [c[0] for c in calls]
    busy = idle = 0
    host_idle = queued_idle = 0
    by_call = collections.Counter()
    by_pair = collections.Counter()
    gaps = []
    reach = begin
    prev_name = "(window start)"
    for a in gpu:
        if a[1] <= begin or a[0] >= end:
            continue
        start = max(a[0], begin)
        if start > reach:
            gap = start - reach
            idle += gap
            launch = launches.get(a[2])
            during = collections.Counter()
            if launch is None:
                kind = "unattributed"
            elif launch[0] > reach:
                kind = "host"
                host_idle += gap
                # From the call in flight when the GPU went idle (calls on one thread do not
                # nest, so a few steps back reach it) to the launch.
                i = bisect.bisect_left(call_starts, reach)
                i -= next((k for k in range(1, min(i, 64) + 1) if calls[i - k][1] > reach), 0)
                while i < len(calls) and calls[i][0] < launch[0]:
                    c = calls[i]
                    if c[1] > reach:
                        during[c[3]] += min(c[1], launch[0]) - max(c[0], reach)
                    i += 1
                own = gap - sum(during.values())
                by_call.update(during)
                by_call["(host code, no driver call)"] += max(own, 0)
            else:
                kind = "queued"
                queued_idle += gap
            gaps.append((gap, kind, prev_name, a[3], during))
            by_pair[(kind, short(prev_name, 40), short(a[3], 40))] += gap
        busy += max(0, min(a[1], end) - max(start, reach))
        reach = max(reach, min(a[1], end))
        prev_name = a[3]
    wall = end - begin
    print(f"{steps} steps: {wall / 1e6:.2f} ms wall, GPU busy {busy / 1e6:.2f} ms, "
          f"idle {idle / 1e6:.2f} ms ({100 * idle / wall:.1f}%): waiting for the host "
          f"{host_idle / 1e6:.2f} ms, with the launch queued {queued_idle / 1e6:.2f} ms")
    in_window = [s for s in syncs if begin <= s[0] < end]
    if in_window:
        print(f"synchronizations in the window: {len(in_window)}, "
              f"{sum(s[1] - s[0] for s in in_window) / 1e3:.1f} us")
    if by_call:
        print("\nhost time while the GPU waited, by driver call (us):")
        for name, ns in by_call.most_common(15):
            print(f"  {ns / 1e3:10.1f}  {name}")
    print("\nidle by (kind, kernel before, kernel after), largest first (us, count):")
    counts = collections.Counter((g[1], short(g[2], 40), short(g[3], 40)) for g in gaps)
    for key, ns in by_pair.most_common(25):
        print(f"  {ns / 1e3:9.1f} {counts[key]:5d}  {key[0]:12s} {key[1]:40s} -> {key[2]}")
    print("\nthe 15 longest gaps (us):")
    for gap, kind, before, after, during in sorted(gaps, key=lambda g: -g[0])[:15]:
        calls_text = ", ".join(f"{n} {ns / 1e3:.0f}" for n, ns in during.most_common(4))
        print(f"  {gap / 1e3:9.1f}  {kind:12s} {short(before, 36)} -> {short(after, 36)}  {calls_text}")


if __name__ == "__main__":
    main(sys.argv[1:])
