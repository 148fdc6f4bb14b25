#!/usr/bin/env bash
# Before and after a change: two llmtool builds on the same `llmtool bench` rows, alternated
# round by round (A then B in odd rounds, B then A in even ones), each row in its own process,
# then one line per row with both builds' tokens/s in every round, their medians and B's ratio
# to A (bench/ab_table.py). Works on any device; on a GPU machine run it from `.device/`
# beside the two CUDA binaries (`../shared/cuda/build.sh --bin llmtool`, once per checkout).
#   [ROUNDS=2] [OUT=dir] bash ab.sh A_BINARY B_BINARY ROW [ROW...]
# Each ROW is the bench flags of one row as one argument, e.g.
#   bash ab.sh ./llmtool-main ./llmtool-new \
#     "--device cuda --sizes 1b --tasks lora --modes bf16 --rank 16 --lora-targets all --batch 4 --seq 2048" \
#     "--device cuda --sizes base --tasks train --modes bf16"
# Raw rows go to OUT/ab-rows.jsonl (each with "build": "A" or "B", the binary's path as
# given, and "round"), each run's output to OUT/ab-log.txt; the table is printed and written to
# OUT/ab-table.txt. OUT defaults to $OUT (the device tool's output folder) or here. Environment
# variables reach both builds as they are.
set -u
if [ $# -lt 3 ]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
a=$1 b=$2
shift 2
OUT=${OUT:-$PWD}
ROUNDS=${ROUNDS:-2}
for binary in "$a" "$b"; do
  [ -x "$binary" ] || { echo "ab.sh: $binary is not an executable file" >&2; exit 2; }
done
mkdir -p "$OUT"
rows=$OUT/ab-rows.jsonl log=$OUT/ab-log.txt
: > "$rows"
: > "$log"
failed=0
# One row on one build; its JSON lines are tagged with the build, the binary and the round.
run() { # build binary round flags
  local part status
  part=$(mktemp)
  # shellcheck disable=SC2086 # a row's flags are split on purpose
  "$2" bench $4 --out "$part" >> "$log" 2>&1
  status=$?
  echo "--- build $1 ($2), round $3, rc=$status: $4" >> "$log"
  [ $status = 0 ] || failed=1
  python3 - "$1" "$2" "$3" "$part" >> "$rows" <<'PY'
import json, sys
build, binary, round_, part = sys.argv[1:]
for line in open(part):
    if line.strip():
        row = json.loads(line)
        row.update(build=build, binary=binary, round=int(round_))
        print(json.dumps(row, sort_keys=True))
PY
  rm -f "$part"
}
for round in $(seq 1 "$ROUNDS"); do
  for row in "$@"; do
    if [ $((round % 2)) = 1 ]; then
      run A "$a" "$round" "$row"
      run B "$b" "$round" "$row"
    else
      run B "$b" "$round" "$row"
      run A "$a" "$round" "$row"
    fi
  done
done
python3 "$here/ab_table.py" "$rows" | tee "$OUT/ab-table.txt"
[ $failed = 0 ] || { echo "ab.sh: some runs failed (see $log)" >&2; exit 1; }
