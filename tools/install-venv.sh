#!/usr/bin/env bash
# Installs the project, with its extras, into a virtual environment: tools/install-venv.sh VENV SPEC
# (SPEC as pip takes it, e.g. '.[dev]').
#
# With uv when it can be had (pip installs it from the package index into VENV): uv unpacks and byte-compiles
# in parallel, which matters for torch's CUDA wheels (about 4 GB unpacked): on this project's 2-core machine
# about 55 s against about 120 s with pip. uv is given pip's own configuration (`pip config list`: find-links,
# index and extra-index URLs, constraints, certificate), so both install the same versions. When uv cannot be
# installed or fails, pip installs as before.
set -euo pipefail
venv=$1
spec=$2
py="$venv/bin/python"

with_pip() {
  "$py" -m pip install --quiet --upgrade pip
  "$py" -m pip install --quiet -e "$spec"
}

# (one short try: where the index cannot be reached, pip's own retries would wait minutes before the fallback)
if [ "${MCPIPE_INSTALL_WITH:-uv}" = pip ] || \
    ! "$py" -m pip install --quiet --retries 1 --timeout 15 uv >/dev/null 2>&1; then
  with_pip
  exit 0
fi

# pip's settings (files and PIP_* variables), as uv options; values seen twice are passed once
args=()
declare -A seen=()
while IFS= read -r line; do
  key=${line%%=*}
  key=${key##*.}
  value=${line#*=}
  value=${value#\'}
  value=${value%\'}
  for v in $value; do
    case $key in
      find-links) opt=--find-links ;;
      index-url) opt=--index-url ;;
      extra-index-url) opt=--extra-index-url ;;
      constraint) opt=--constraint ;;
      cert) export SSL_CERT_FILE=$v; continue ;;
      *) continue ;;
    esac
    [ -n "${seen[$opt $v]:-}" ] && continue
    seen[$opt $v]=1
    args+=("$opt" "$v")
  done
done < <("$py" -m pip config list 2>/dev/null || true)

# unsafe-best-match: the newest version over all indexes, as pip chooses (uv's default stops at the first index
# that has the package)
if ! "$venv/bin/uv" pip install --python "$py" --quiet --compile-bytecode --index-strategy unsafe-best-match \
    "${args[@]}" -e "$spec"; then
  echo "install-venv: uv failed (above); installing with pip" >&2
  with_pip
fi
