#!/usr/bin/env bash
# The C core under valgrind memcheck: no invalid reads or writes anywhere, no definite
# leak with a frame in the extension's C. Slow (about 50x): run by hand, not in CI.
#
#   bash scripts/memcheck.sh [pytest args]    # default: the core test modules
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(tests/test_context.py tests/test_hard.py tests/test_memory.py
                               tests/test_meter.py tests/test_units.py)
# PYTHONMALLOC=malloc: every block goes through libc, where memcheck can see it (pymalloc's
# arenas would hide our mistakes and report its own false positives)
PYTHONMALLOC=malloc valgrind --tool=memcheck --leak-check=full --show-leak-kinds=definite \
    --errors-for-leak-kinds=definite --num-callers=30 --log-file="$log" \
    python -m pytest -q -p no:cacheprovider -x "${args[@]}" || true
# Our frames: "(hook.c:123)" for each C source and header of the extension (it is
# built with debug information), or "(in .../_meter.cpython-...so)" without it. An error is ours when a
# frame of its stack is; a definite leak is ours when the extension called the allocator
# itself (tracemalloc's own leaks under our hook are not).
ours="[(]($(cd src/_meter && ls -- *.c *.h | sed 's/[.]\([ch]\)$/[.]\1/' | paste -sd'|' -)):|_meter[.]cpython"
errors=$(awk -v ours="$ours" '/Invalid (read|write)|uninitialised|Invalid free|Mismatched free/{b=1; s=""}
              b{s=s $0} /^==[0-9]+== $/{if (b && s ~ ours) n++; b=0} END{print n+0}' "$log")
leaks=$(awk -v ours="$ours" '/definitely lost/{b=1; k=0; next}
             b && /by 0x/{if (++k == 1) {if ($0 ~ ours) n++; b=0}} END{print n+0}' "$log")
grep -E "ERROR SUMMARY|definitely lost" "$log" | tail -2
echo "memcheck: $errors invalid accesses and $leaks definite leaks from the extension (log: $log)"
[ "$errors" -eq 0 ] && [ "$leaks" -eq 0 ]
