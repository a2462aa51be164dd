# Sourced by scripts/demo and scripts/test: finds Python >= 3.12 and makes .venv on first use.
# shellcheck shell=bash
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python() {
    local c v
    for c in python3.13 python3.12 python3 python; do
        if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            command -v "$c"; return 0
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        for v in $(ls -d "$(pyenv root)"/versions/3.1[2-9]* "$(pyenv root)"/versions/3.[2-9][0-9]* 2>/dev/null | sort -rV); do
            for c in "$v"/bin/python3.1[2-9] "$v"/bin/python3; do
                if [ -x "$c" ] && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
                    echo "$c"; return 0
                fi
            done
        done
    fi
    return 1
}

ensure_venv() {
    local stamp="$VENV/.kmi-rotor-installed"
    if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$stamp" -nt "$ROOT/pyproject.toml" ]; then
        return 0
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        local py
        if ! py="$(find_python)"; then
            echo "kmi-rotor needs Python 3.12 or newer and found none." >&2
            echo "Install one (e.g. 'apt-get install python3.12 python3.12-venv', or 'pyenv install 3.12') and run this again." >&2
            exit 1
        fi
        echo "==> creating $VENV with $py ($("$py" --version))" >&2
        "$py" -m venv "$VENV"
    fi
    echo "==> installing kmi-rotor and its test dependencies into .venv (log: .venv/install.log)" >&2
    if ! { "$VENV/bin/python" -m pip install --upgrade pip &&
           "$VENV/bin/python" -m pip install -e "$ROOT[dev]"; } >"$VENV/install.log" 2>&1; then
        tail -n 25 "$VENV/install.log" >&2
        echo "installing into $VENV failed; the whole log is $VENV/install.log" >&2
        exit 1
    fi
    touch "$stamp"
}
