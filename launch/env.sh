# Sourced by the launch scripts: creates .venv if missing and (re)installs a requirements file when it changed.
# Usage: source launch/env.sh requirements.txt
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="${1:-requirements.txt}"
VENV="${RECALL_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
stamp="$VENV/.stamp-$(basename "$REQ")"
want="$(cat "$ROOT/$REQ" "$ROOT/requirements.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[env] installing $REQ into $VENV"
  "$VENV/bin/pip" install -q -r "$ROOT/$REQ" 2> >(grep -v "is ignored: it is neither" >&2)
  "$VENV/bin/pip" install -q --no-deps -e "$ROOT"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
