#!/usr/bin/env bash
# Idempotent setup shared by build.sh and test.sh: Debian speech tools, then a project venv.
# Sourced, not executed: it exports WB_PY (the venv's python) for the caller.
set -euo pipefail
WB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WB_VENV="${WB_VENV:-$WB_ROOT/.venv}"

wb_log() { printf '[setup] %s\n' "$*" >&2; }

wb_need_debs() {
    local missing=()
    command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
    command -v flite >/dev/null 2>&1 || missing+=(flite)
    [ -e /usr/share/games/fortunes/fortunes ] || missing+=(fortunes fortunes-min)
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            wb_log "missing Debian packages: ${missing[*]} (not root and no sudo: install them, then run again)"; return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        wb_log "missing ${missing[*]} and no apt-get: install espeak-ng, flite and the fortunes corpus by hand"; return 1
    fi
    wb_log "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Extras to install: WB_EXTRAS (comma-separated), else dev, plus tensorrt-rtx and minilm in CI (their checks must
# run there); WB_ADD_EXTRAS joins them (build.sh --minilm adds minilm).
wb_extras() {
    local e
    if [ -n "${WB_EXTRAS:-}" ]; then e="$WB_EXTRAS"; elif [ -n "${CI:-}" ]; then e="dev,tensorrt-rtx,minilm,ray"; else e="dev"; fi
    local x add="${WB_ADD_EXTRAS:-}"
    for x in ${add//,/ }; do [[ ",$e," == *",$x,"* ]] || e="$e,$x"; done
    echo "$e"
}

wb_need_venv() {
    local stamp="$WB_VENV/.wb-stamp" want extras
    extras="$(wb_extras)"
    # constraints.txt: the exact versions CI tested (WB_LOCK=0 installs from pyproject.toml's ranges instead)
    local lock=()
    [ "${WB_LOCK:-1}" != 0 ] && [ -f "$WB_ROOT/constraints.txt" ] && lock=(-c "$WB_ROOT/constraints.txt")
    want="$( (cat "$WB_ROOT/pyproject.toml" "${lock[@]:1}"; echo "extras=$extras") | sha256sum | cut -c1-16)"
    if [ -x "$WB_VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then return 0; fi
    local py="${PYTHON:-python3}"
    [ -x "$WB_VENV/bin/python" ] || { wb_log "creating venv $WB_VENV"; "$py" -m venv "$WB_VENV"; }
    local pip=("$WB_VENV/bin/python" -m pip -q --disable-pip-version-check)
    if ! "$WB_VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
        # A pinned torch first: on these machines pip takes a local CPU wheel for it; elsewhere the registry's build.
        wb_log "installing torch ${WB_TORCH_SPEC:-torch==2.13.0}"
        "${pip[@]}" install "${WB_TORCH_SPEC:-torch==2.13.0}" "${lock[@]}" 2> >(grep -v 'is ignored' >&2)
    fi
    wb_log "installing the project (editable) and its dependencies (extras: $extras)"
    "${pip[@]}" install -e "$WB_ROOT[$extras]" "${lock[@]}" 2> >(grep -v 'is ignored' >&2)
    echo "$want" > "$stamp"
}

wb_need_debs
wb_need_venv
export WB_PY="$WB_VENV/bin/python"
