#!/usr/bin/env bash
# Instructions per edit of bench/durable_path.py (durable acks on files), counted by
# callgrind in every thread: the difference of two runs (ROUNDS and 3x ROUNDS rounds)
# over the edits between them, so set-up and imports cancel out. User-space only: the
# kernel's share of the system calls is not counted. Needs valgrind; run from the
# repository. Extra arguments go to durable_path.py (e.g. --rooms 200 --editors 2).
set -euo pipefail
rounds=${ROUNDS:-100}
rooms=10 editors=5
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --rooms) rooms=${args[i + 1]} ;;
    --editors) editors=${args[i + 1]} ;;
  esac
done
count() {
  ROUNDS=$1 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    "${PYTHON:-.venv/bin/python}" bench/durable_path.py --warmup 20 "${args[@]}" 2>&1 |
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
short=$(count "$rounds")
long=$(count $((rounds * 3)))
echo "instructions per edit: $(((long - short) / (rounds * 2 * rooms * editors)))"
