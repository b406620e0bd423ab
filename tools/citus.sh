#!/usr/bin/env bash
# Builds Citus 14.0.1 from source into the embedded PostgreSQL 18 tree (make citus), for the
# multi-node tests. Idempotent: a second run does nothing. The source is the tarball in
# ../shared/citus (or $RSCLIP_SHARED/citus) when there is one, else the upstream release; its
# sha256 is checked either way.
# Citus 14 supports PostgreSQL 16-18 only, so there is no PG15 build.
set -euo pipefail
source "$(dirname "$0")/env.sh"
say() { echo "citus: $*"; }

VERSION=14.0.1
SHA256=acfa9a77cd84a8e1edab26cca4a71355f39c910c01586da89560e0240d4b05ba
TARBALL="citus-$VERSION.tar.gz"
# RSCLIP_SHARED names the shared folder when it is not beside the checkout.
SHARED="${RSCLIP_SHARED:-$RSCLIP_ROOT/../shared}/citus/$TARBALL"
UPSTREAM="https://github.com/citusdata/citus/archive/refs/tags/v$VERSION.tar.gz"

pkglibdir="$("$PG18_CONFIG" --pkglibdir)"
stamp="$pkglibdir/citus.rsclip-build"
if [ -f "$pkglibdir/citus.so" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$VERSION $SHA256" ]; then
    exit 0
fi

missing=()
for p in liblz4-dev libzstd-dev clang; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing apt packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

work="$RSCLIP_LOCAL/citus-build"
rm -rf "$work" && mkdir -p "$work"
if [ -f "$SHARED" ]; then
    cp "$SHARED" "$work/$TARBALL"
else
    say "downloading $UPSTREAM"
    curl -fsSL -o "$work/$TARBALL" "$UPSTREAM"
fi
echo "$SHA256  $work/$TARBALL" | sha256sum -c --quiet \
    || { echo "citus: $TARBALL does not match its sha256 $SHA256" >&2; exit 1; }
tar -xzf "$work/$TARBALL" -C "$work"
src="$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -1)"
say "building Citus $VERSION (about 90 s on 2 cores)"
# clang: the wheel's pg_config CFLAGS carry clang-only flags. libcurl only serves Citus's
# anonymous statistics collection, which we do not want.
(cd "$src" && CC=clang ./configure PG_CONFIG="$PG18_CONFIG" --without-libcurl >"$work/configure.log" 2>&1 \
    && make -j"$(nproc)" >"$work/make.log" 2>&1 && make install >"$work/install.log" 2>&1) \
    || { echo "citus: build failed; see $work/*.log" >&2; tail -n 30 "$work"/*.log >&2; exit 1; }
echo "$VERSION $SHA256" > "$stamp"
rm -rf "$src"
say "installed Citus $VERSION into $(dirname "$pkglibdir")"
