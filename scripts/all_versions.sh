#!/usr/bin/env bash
# Run the test suite on every supported CPython found on this machine.
#
#   scripts/all_versions.sh                  # the whole suite (slow tests too), every interpreter found
#   scripts/all_versions.sh tests/test_crash_threads.py -k item06    # pytest arguments
#   HARNESS=1 scripts/all_versions.sh        # also the full fault-injection harness
#   PYTHONS="python3 /opt/py315/bin/python3.15" scripts/all_versions.sh
#
# For each interpreter: a venv under $VENV_ROOT (default /work, named
# venv-crash-<version>), the package installed editable with its test extra (which
# builds the C extension for that interpreter), then pytest. Prints one summary line
# per version at the end and exits non-zero if any version failed.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
venv_root=${VENV_ROOT:-/work}
timeout_s=${SUITE_TIMEOUT:-3600}
candidates=${PYTHONS:-"python3 python3.11 $HOME/.pyenv/versions/3.12.1/bin/python
  $HOME/.pyenv/versions/3.13.0/bin/python /opt/py314/bin/python3.14 /opt/py315/bin/python3.15
  /opt/py315d/bin/python3.15d"}
declare -A seen=()
summary=()
status=0
for py in $candidates; do
    command -v "$py" >/dev/null 2>&1 || continue
    tag=$("$py" -c 'import sys; print("%d%d%s" % (sys.version_info[:2] + ("d" if hasattr(sys, "gettotalrefcount") else "",)))' 2>/dev/null) || continue
    [ -n "${seen[$tag]:-}" ] && continue
    seen[$tag]=1
    version=$("$py" -c 'import sys; print(sys.version.split()[0])')
    venv="$venv_root/venv-crash-$tag"
    log="$venv_root/venv-crash-$tag.log"
    echo "=== $version ($py) -> $venv" >&2
    if [ ! -x "$venv/bin/python" ] && ! "$py" -m venv "$venv" >"$log" 2>&1; then
        summary+=("$version: FAILED to make a venv (see $log)"); status=1; continue
    fi
    if ! "$venv/bin/pip" install -q -e "$here[test]" >"$log" 2>&1; then
        summary+=("$version: FAILED to install (see $log)"); status=1; continue
    fi
    if ! "$venv/bin/python" -c 'import test.test_json' 2>/dev/null; then
        echo "note: $version has no CPython test suite (test.test_json): the harness" \
             "tests will skip or fail" >&2
    fi
    (cd "$here" && timeout "$timeout_s" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        -m "slow or not slow" "$@") >>"$log" 2>&1
    rc=$?
    line=$(grep -E '^(=+ )?[0-9]+ (passed|failed)|^(=+ )?[0-9]+ .*(passed|failed|error)' "$log" | tail -1)
    [ $rc -eq 124 ] && line="TIMEOUT after ${timeout_s}s"
    [ $rc -ne 0 ] && status=1
    entry="$version: pytest exit $rc: ${line:-no summary} (log: $log)"
    if [ -n "${HARNESS:-}" ]; then
        (cd "$here" && "$venv/bin/python" scripts/fault_inject.py --log-dir "$venv_root/fault-inject-$tag") \
            >"$venv_root/fault-inject-$tag.txt" 2>&1
        hrc=$?
        [ $hrc -ne 0 ] && status=1
        entry="$entry; harness exit $hrc: $(tail -1 "$venv_root/fault-inject-$tag.txt")"
    fi
    summary+=("$entry")
done
echo
for entry in "${summary[@]}"; do echo "$entry"; done
[ ${#summary[@]} -eq 0 ] && { echo "no interpreter found"; exit 1; }
exit $status
