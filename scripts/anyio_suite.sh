#!/usr/bin/env bash
# anyio's own test suite (from its sdist), bare and with every test body inside a gotcha
# scope (the pytest plugin's --gotcha-report measures every test); prints the tests whose
# outcome differs. Takes about five minutes; run by hand, not in CI.
#
#   bash scripts/anyio_suite.sh [anyio version]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=${1:-$(python -c "import importlib.metadata as m; print(m.version('anyio'))")}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
python -m venv venv
venv/bin/pip install -q -e "$root" "anyio==$version" trio blockbuster coverage hypothesis \
    psutil "pytest>=9" pytest-mock pytest-timeout trustme truststore uvloop
venv/bin/pip download -q --no-binary :all: --no-deps "anyio==$version"
tar xzf "anyio-$version.tar.gz"
cd "anyio-$version"
run() {
    # $1 names the run; anyio's addopts load plugins by module, here they load by entry point
    name=$1
    shift
    "$work/venv/bin/pytest" tests -q -rfE -p no:cacheprovider --timeout=60 -o addopts="" "$@" \
        > "$work/$name.log" 2>&1 || true
    grep -E "^(FAILED|ERROR) " "$work/$name.log" | sed 's/ - .*//' | sort > "$work/$name.txt"
    tail -n 1 "$work/$name.log"
}
echo "bare:   $(run bare)"
echo "gotcha: $(run gotcha --gotcha-report)"
echo "failing only with gotcha:"
comm -13 "$work/bare.txt" "$work/gotcha.txt" || true
