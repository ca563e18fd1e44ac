#!/usr/bin/env bash
# Instructions per frame of bench/frame_path.py, counted by callgrind: the difference of
# two runs (3000 and 9000 frames) over the 6000 frames between them, so set-up and
# imports cancel out. Repeats to about 0.1 %; needs valgrind. Run from the repository.
set -euo pipefail
count() {
  FRAMES=$1 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    .venv/bin/python bench/frame_path.py 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
short=$(count 3000)
long=$(count 9000)
echo "instructions per frame: $(((long - short) / 6000))"
