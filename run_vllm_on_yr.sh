#!/usr/bin/env bash
# Prefill/decode-disaggregated vLLM on openYuanrong.
#   bash run_vllm_on_yr.sh deploy|status|logs|clean [--flags]   operate the service
#   bash run_vllm_on_yr.sh test [pytest args]                   set up and run the tests
#   bash run_vllm_on_yr.sh install                              only set up the environment
# The environment (.venv) is created on first use with the pinned dependencies for
# ACCELERATOR (cpu | cuda | ascend; detected when unset).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV_DIR:-$ROOT/.venv}"

detect_accelerator() {
  if [[ -n "${ACCELERATOR:-}" ]]; then echo "${ACCELERATOR,,}"
  elif [[ -e /dev/davinci0 ]]; then echo ascend
  elif [[ -e /dev/nvidia0 ]]; then echo cuda
  else echo cpu
  fi
}

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.11 python3; do
    [[ -n "$candidate" ]] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
  return 2
}

ensure_env() {
  local accelerator requirements stamp python
  accelerator="$(detect_accelerator)"
  requirements="$ROOT/deploy/requirements/$accelerator.txt"
  if [[ ! -f "$requirements" ]]; then
    echo "error: ACCELERATOR=$accelerator is invalid: must be one of cpu, cuda, ascend" >&2
    exit 2
  fi
  stamp="$VENV/.installed-$accelerator-$(cat "$ROOT"/deploy/requirements/*.txt | sha256sum | cut -c1-16)"
  [[ -f "$stamp" ]] && return 0
  python="$(find_python)"
  echo "setting up $VENV for $accelerator (first run only, a few minutes) ..." >&2
  [[ -x "$VENV/bin/python" ]] || "$python" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -r "$requirements" >&2
  if [[ "$accelerator" == cpu ]]; then
    "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >&2 || true
  fi
  rm -f "$VENV"/.installed-*
  touch "$stamp"
  echo "environment ready: $VENV" >&2
}

verb="${1:-}"
case "$verb" in
  deploy|status|logs|clean)
    ensure_env
    cd "$ROOT"
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$VENV/bin/python" -m deploy.cli "$@"
    ;;
  test)
    shift
    ensure_env
    cd "$ROOT"
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$VENV/bin/python" -m pytest tests "$@"
    ;;
  install)
    ensure_env
    ;;
  *)
    echo "usage: bash run_vllm_on_yr.sh deploy|status|logs|clean|test|install [options]" >&2
    echo "error: unknown verb '${verb}': must be one of deploy, status, logs, clean, test, install" >&2
    exit 2
    ;;
esac
