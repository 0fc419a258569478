#!/usr/bin/env bash
# Install pyfuse3 3.5.0 with fusesnap's patches (0001-0011) into the venv $1
# (see README.md here). Idempotent: does nothing when the venv already has this
# build; reuses a wheel built earlier for the same patch from $2 (cache dir).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=$1
cache=${2:-$(dirname "$venv")/wheels}
upstream=3.5.0
local_tag=fusesnap9
version="$upstream+$local_tag"

have=$("$venv/bin/python" - <<'PY' 2>/dev/null || true
from importlib.metadata import version
print(version("pyfuse3"))
PY
)
[ "$have" = "$version" ] && exit 0

# The wheel name carries the interpreter tag; the cache key is the patch's hash
# too, so editing the patch without bumping local_tag still rebuilds.
sum=$(cat "$here"/*.patch | sha256sum | cut -c1-12)
whl_dir="$cache/pyfuse3-$version-$sum"
whl=$(ls "$whl_dir"/pyfuse3-*.whl 2>/dev/null | head -n1 || true)
pyver=$("$venv/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
case "$whl" in *-"$pyver"-*) ;; *) whl= ;; esac

if [ -z "$whl" ]; then
    echo "setup: building pyfuse3 $version (fusesnap patches)" >&2
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$venv/bin/pip" download -q --no-binary :all: --no-deps -d "$work" "pyfuse3==$upstream"
    tar -xzf "$work/pyfuse3-$upstream.tar.gz" -C "$work"
    src="$work/pyfuse3-$upstream"
    for p in "$here"/*.patch; do patch -s -p1 -d "$src" < "$p"; done
    # 0007 leaves the version to fill in (no importlib.metadata lookup at import)
    sed -i "s/@PYFUSE3_VERSION@/$version/" "$src/src/pyfuse3/_pyfuse3.py"
    # The sdist ships a pre-generated __init__.c; force Cython to regenerate it.
    rm -f "$src/src/pyfuse3/__init__.c"
    mkdir -p "$whl_dir"
    SETUPTOOLS_SCM_PRETEND_VERSION="$version" \
        "$venv/bin/pip" wheel -q --no-deps -w "$work/dist" "$src"
    built=$(ls "$work"/dist/pyfuse3-*.whl)
    # Copy then rename: concurrent setups (other venvs) never see half a wheel.
    install -m 0644 "$built" "$whl_dir/.partial.$$"
    mv -f "$whl_dir/.partial.$$" "$whl_dir/$(basename "$built")"
    whl="$whl_dir/$(basename "$built")"
fi
"$venv/bin/pip" install -q --no-deps --force-reinstall "$whl"
