#!/usr/bin/env bash
# Installs onnxruntime's C/C++ API headers (onnxruntime_c_api.h,
# onnxruntime_cxx_api.h, ...), which the package's onnxruntime custom-op
# library (sasa_mmdet/deployment/csrc/) is compiled against. The onnxruntime
# wheel on PyPI ships the runtime library but no headers; Debian packages them
# as libonnxruntime-dev (Debian 13 "trixie" and later).
#
# - Debian 13 or later: `apt-get install libonnxruntime-dev` (headers in
#   /usr/include/onnxruntime).
# - Debian 12 "bookworm" (no onnxruntime package): the same Debian package,
#   trixie's libonnxruntime-dev, is downloaded with apt (signatures checked
#   against the system's Debian keyring, with a private apt state: the
#   system's sources are not touched) and only its headers are unpacked into
#   ${SASA_MMDET_CACHE:-~/.cache/sasa_mmdet}/onnxruntime-headers/. Nothing is
#   installed system-wide: its shared library would need trixie's libc.
#
# The custom-op library uses only the C API's ABI-stable function table, so
# headers of an older onnxruntime (trixie: 1.21) build a library that the
# newer runtime of the wheel loads.
#
# Then `python setup.py build_ext --inplace` (or the editable install) builds
# sasa_mmdet/deployment/_onnxruntime_ops*.so; setup.py finds the headers in
# $ONNXRUNTIME_INCLUDE_DIR, /usr/include/onnxruntime or the cache above.
#
# Usage: bash tools/deployment/install_onnxruntime_headers.sh   (as root)
set -euo pipefail

say() { echo "[onnxruntime headers] $*"; }

if [ -f /usr/include/onnxruntime/onnxruntime_cxx_api.h ]; then
    say "already installed: /usr/include/onnxruntime"
    exit 0
fi
cache="${SASA_MMDET_CACHE:-$HOME/.cache/sasa_mmdet}/onnxruntime-headers"
if [ -f "$cache/include/onnxruntime/onnxruntime_cxx_api.h" ]; then
    say "already unpacked: $cache/include/onnxruntime"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    say "no apt-get: install onnxruntime's C/C++ headers by hand and set ONNXRUNTIME_INCLUDE_DIR" >&2
    exit 1
fi

if apt-cache show libonnxruntime-dev >/dev/null 2>&1; then
    say "apt-get install libonnxruntime-dev"
    apt-get install -y --no-install-recommends libonnxruntime-dev
    exit 0
fi

say "this Debian has no libonnxruntime-dev: unpacking the headers of Debian 13's into $cache"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo "deb http://deb.debian.org/debian trixie main" > "$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
          -o "Dir::State::status=/dev/null" -o "APT::Sandbox::User=root")
apt-get "${apt_opts[@]}" update -qq
(cd "$work" && apt-get "${apt_opts[@]}" download libonnxruntime-dev)
dpkg-deb -x "$work"/libonnxruntime-dev_*.deb "$work/root"
mkdir -p "$cache/include"
rm -rf "$cache/include/onnxruntime"
cp -r "$work/root/usr/include/onnxruntime" "$cache/include/"
cp "$work/root/usr/share/doc/libonnxruntime-dev/copyright" "$cache/"
say "headers in $cache/include/onnxruntime ($(basename "$work"/libonnxruntime-dev_*.deb))"
