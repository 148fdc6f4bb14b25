#!/usr/bin/env python3
"""The table of bench/ab.sh: one line per bench row, builds A and B side by side.

    python3 bench/ab_table.py ab-rows.jsonl

Rows are the JSON lines of `llmtool bench` tagged with "build" ("A" or "B") and "round".
Rows are the same row when every field but the measured ones is equal (task, preset, mode,
batch, seq, rank, targets, ...). For each it prints both builds' rate in every round
(tokens/s; for `--tasks ops` rows the fused kernel's ms), the medians, B's speed relative to
A (above 1: B is faster), both builds' median peak MB and, for training rows, their median
last-step loss (same seed and batch: builds that compute alike agree to rounding). Failed op
checks, replayed decodes that differ from op by op, and rows only one build produced are
listed after the table.
"""

import json
import statistics
import sys

# Fields a run measures (or that describe the binary): every other field names the row.
MEASURED = {
    "binary", "build", "round", "tool", "tokens_per_s", "step_ms", "ms", "model_tflops",
    "peak_mb", "peak_smi_mb", "reserved_peak_mb", "in_use_at_start_mb", "peak_note",
    "fused_ms", "reference_ms", "speedup", "max_rel_error", "ok", "error",
    "same_tokens_as_op_by_op", "steps", "params", "trainable", "tolerance", "loss",
}
NAME_ORDER = ["task", "preset", "mode", "op", "shapes", "batch", "seq", "rank", "lora_targets",
              "lora_base", "new_tokens", "prompt_tokens", "ranks"]


def row_name(row):
    """The fields that say which row this is, in a fixed order, as a short label."""
    keys = sorted((k for k in row if k not in MEASURED),
                  key=lambda k: (NAME_ORDER.index(k) if k in NAME_ORDER else len(NAME_ORDER), k))

    def field(k):
        if k in ("task", "preset", "mode", "op"):
            return str(row[k])
        if k == "shapes":  # an op check's operands, e.g. 2x3x7x8,2x3x7x8
            return ",".join("x".join(map(str, shape)) for shape in row[k])
        return f"{k}={row[k]}"

    return " ".join(field(k) for k in keys)


def rate(row):
    """(value, higher is better) of a row: tokens/s, or the fused kernel's ms of an op check."""
    if row.get("tokens_per_s") is not None:
        return row["tokens_per_s"], True
    if row.get("fused_ms") is not None:
        return row["fused_ms"], False
    return None, True


def fmt(value):
    return "-" if value is None else (f"{value:,.0f}" if value >= 100 else f"{value:.3g}")


def main(path):
    groups, problems = {}, []
    for number, line in enumerate(open(path), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        name = row_name(row)
        build = row.get("build")
        if build not in ("A", "B"):
            sys.exit(f"{path}:{number}: no \"build\": \"A\" or \"B\" in the row")
        groups.setdefault(name, {"A": [], "B": []})[build].append(row)
        if row.get("ok") is False:
            problems.append(f"build {build}, round {row.get('round')}: {name} failed its check "
                            f"(error {row.get('max_rel_error', row.get('error'))})")
        if row.get("same_tokens_as_op_by_op") is False:
            problems.append(f"build {build}, round {row.get('round')}: {name} replayed other "
                            "tokens than op by op")
    width = max([len(name) for name in groups] + [3])
    print(f"{'row':<{width}} {'A (rounds)':>24} {'B (rounds)':>24} {'B/A':>7} {'peak MB A / B':>17}"
          f" {'loss A / B':>17}")
    for name, builds in groups.items():
        if not builds["A"] or not builds["B"]:
            only = "A" if builds["A"] else "B"
            problems.append(f"{name}: only build {only} produced this row")
            continue
        cells, medians, peaks, losses, higher = [], [], [], [], True
        for build in ("A", "B"):
            values = [rate(r)[0] for r in sorted(builds[build], key=lambda r: r.get("round", 0))]
            higher = rate(builds[build][0])[1]
            known = [v for v in values if v is not None]
            medians.append(statistics.median(known) if known else None)
            cells.append(" / ".join(fmt(v) for v in values))
            peak = [r["peak_mb"] for r in builds[build] if r.get("peak_mb") is not None]
            peaks.append(fmt(statistics.median(peak)) if peak else "-")
            loss = [r["loss"] for r in builds[build] if r.get("loss") is not None]
            losses.append(f"{statistics.median(loss):.4f}" if loss else "-")
        a, b = medians
        ratio = "-" if not a or not b else f"{(b / a if higher else a / b):.3f}"
        print(f"{name:<{width}} {cells[0]:>24} {cells[1]:>24} {ratio:>7} {peaks[0] + ' / ' + peaks[1]:>17}"
              f" {losses[0] + ' / ' + losses[1]:>17}")
    for problem in problems:
        print("!", problem)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
