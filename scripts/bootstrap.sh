#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 machine (run as root, or with
# the Debian packages already present): system packages, then the pinned Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(postgresql postgresql-contrib gnupg zstd chromium prometheus prometheus-pushgateway make faketime)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: missing Debian packages: ${missing[*]}; install them as root (apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if ! command -v uv >/dev/null 2>&1; then
  echo "bootstrap: installing uv"
  "$PYTHON" -m pip install -q uv
fi
# The lock file pins every package: a fresh machine gets exactly the tested set. Bytecode is
# compiled now, once: with PYTHONDONTWRITEBYTECODE set (common in containers and CI images)
# Python would otherwise recompile Dagster, pydantic and psycopg from source in every process,
# which costs seconds per CLI call, Dagster step and definitions load.
uv sync --frozen --all-extras --compile-bytecode --python "$PYTHON" -q
.venv/bin/python -m compileall -q -j 0 backup_pipelines
# drizzle-orm's own migrator, so the rollback tests can prove compatibility with the real thing.
if command -v npm >/dev/null 2>&1 && [ ! -d examples/drizzle/node_modules/drizzle-orm ]; then
  (cd examples/drizzle && npm ci --no-audit --no-fund --loglevel=error >/dev/null 2>&1) \
    || echo "bootstrap: npm ci in examples/drizzle failed; the drizzle-orm compatibility test will skip" >&2
fi
echo "bootstrap: environment ready (.venv)"
