#!/usr/bin/env bash
# Refresh constraints.txt, the exact versions CI and tools/bootstrap.sh install: resolve pyproject.toml's ranges
# afresh in a throw-away venv (newest versions they allow, extras that CI installs included), then write the
# result. Run ./test.sh afterwards (the stamp sees the new lock and reinstalls) and commit the lock only if green.
#   tools/refresh_lock.sh [EXTRAS]      default EXTRAS: dev,tensorrt-rtx,minilm
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
extras="${1:-dev,tensorrt-rtx,minilm}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip -q --disable-pip-version-check)
"${pip[@]}" install "${WB_TORCH_SPEC:-torch==2.13.0}"
"${pip[@]}" install "$root[$extras]"
{
    echo "# Exact versions tested by CI (tools/bootstrap.sh installs with -c constraints.txt; pyproject.toml keeps"
    echo "# the ranges users install from). Refresh: tools/refresh_lock.sh, then ./test.sh. Written $(date -u +%F)."
    # the local build tag (+cpu) is left out: '==2.13.0' admits the local CPU wheel and the registry's build
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -v -i '^trt-int8-workbench' | sed -E 's/\+[a-z0-9.]+$//'
} > "$root/constraints.txt.new"
mv "$root/constraints.txt.new" "$root/constraints.txt"
echo "wrote $root/constraints.txt"
