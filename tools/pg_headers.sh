#!/usr/bin/env bash
# Server headers of PostgreSQL 16 and 17, so that CI compiles and lints the crate's pg16 and pg17
# features (tests run on 18 and 15; 16 and 17 are built, not run). Idempotent.
#   PG16: the PyPI wheel pgserver==0.1.4 (PostgreSQL 16.2 with headers and a real pg_config),
#         checked against its sha256.
#   PG17: Debian 13's postgresql-server-dev-17, fetched with apt's own signature and hash checks
#         (a private package list, so the system's apt state is untouched) and unpacked, not
#         installed; its pg_config binary needs Debian 13's libc, so a small script stands in for
#         it, answering what pgrx asks.
set -euo pipefail
source "$(dirname "$0")/env.sh"
say() { echo "pg_headers: $*"; }

PG16_WHEEL="pgserver-0.1.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
PG16_SHA256="d595789b47624a3d963aa9aa6359da9be31beb7e61f1a45541953242068b8813"

if [ ! -x "$PG16_CONFIG" ]; then
    say "fetching PostgreSQL 16 headers (pgserver wheel)"
    tmp="$RSCLIP_LOCAL/pg16.tmp"
    rm -rf "$tmp" && mkdir -p "$tmp"
    "$RSCLIP_VENV/bin/pip" download -q --disable-pip-version-check --no-deps -d "$tmp" "pgserver==0.1.4" \
        --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.11
    echo "$PG16_SHA256  $tmp/$PG16_WHEEL" | sha256sum -c --quiet
    (cd "$tmp" && "$RSCLIP_VENV/bin/python" -m zipfile -e "$PG16_WHEEL" . && rm "$PG16_WHEEL")
    chmod +x "$tmp"/pgserver/pginstall/bin/*
    rm -rf "$RSCLIP_LOCAL/pg16" && mv "$tmp" "$RSCLIP_LOCAL/pg16"
fi
"$PG16_CONFIG" --version | grep -q "PostgreSQL 16\." || { echo "pg_headers: $PG16_CONFIG is not PostgreSQL 16" >&2; exit 1; }

if [ ! -x "$PG17_CONFIG" ]; then
    say "fetching PostgreSQL 17 headers (Debian 13's postgresql-server-dev-17)"
    tmp="$RSCLIP_LOCAL/pg17.tmp"
    rm -rf "$tmp" && mkdir -p "$tmp/apt/lists/partial" "$tmp/apt/cache/archives/partial" "$tmp/root"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
        > "$tmp/apt/sources.list"
    apt_opts=(-o Dir::Etc::SourceList="$tmp/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o Dir::State::Lists="$tmp/apt/lists" -o Dir::Cache="$tmp/apt/cache"
              -o Dir::State::status=/dev/null -o APT::Sandbox::User=root -o Debug::NoLocking=1)
    apt-get "${apt_opts[@]}" -qq update
    (cd "$tmp" && apt-get "${apt_opts[@]}" -qq download postgresql-server-dev-17)
    dpkg-deb -x "$tmp"/postgresql-server-dev-17_*.deb "$tmp/root"
    version="$(dpkg-deb -f "$tmp"/postgresql-server-dev-17_*.deb Version)"
    server="$RSCLIP_LOCAL/pg17/root/usr/include/postgresql/17/server"
    [ -f "$tmp/root/usr/include/postgresql/17/server/postgres.h" ] || { echo "pg_headers: no postgres.h in the package" >&2; exit 1; }
    mkdir -p "$tmp/bin"
    cat > "$tmp/bin/pg_config" <<EOF
#!/bin/sh
# Stands in for PostgreSQL 17's pg_config (headers only: nothing here is run or installed).
case "\$1" in
    --version) echo "PostgreSQL ${version%%-*}" ;;
    --includedir-server) echo "$server" ;;
    --includedir|--pkgincludedir) echo "$RSCLIP_LOCAL/pg17/root/usr/include/postgresql" ;;
    --bindir) echo "$RSCLIP_LOCAL/pg17/bin" ;;
    --pkglibdir|--libdir) echo "$RSCLIP_LOCAL/pg17/lib" ;;
    --sharedir) echo "$RSCLIP_LOCAL/pg17/share" ;;
    --cppflags) echo "-D_GNU_SOURCE" ;;
    --cflags) echo "-Wall -fno-strict-aliasing -fwrapv -O2" ;;
    --ldflags|--ldflags_sl|--libs) echo "" ;;
    --configure) echo "'--prefix=/usr'" ;;
    *) echo "pg_config stand-in: unsupported option \$1" >&2; exit 1 ;;
esac
EOF
    chmod +x "$tmp/bin/pg_config"
    rm -rf "$tmp/apt" "$tmp"/postgresql-server-dev-17_*.deb
    mkdir -p "$tmp/lib" "$tmp/share"
    rm -rf "$RSCLIP_LOCAL/pg17" && mv "$tmp" "$RSCLIP_LOCAL/pg17"
fi
"$PG17_CONFIG" --version | grep -q "PostgreSQL 17\." || { echo "pg_headers: $PG17_CONFIG is not PostgreSQL 17" >&2; exit 1; }
