#!/usr/bin/env bash
# megace developer entry point. The README's two commands:
#   ./dev.sh run    set everything up, then run the closed loop on the embedded broker
#   ./dev.sh test   set everything up, then run the whole test suite (on MEGACE_TEST_WORKERS=3 workers)
#   ./dev.sh mutate mutation testing of the core (tools/mutate.py; reports/mutation.md)
# Set-up is idempotent: a venv in .venv with torch 2.13.0 (CPU) and megace[all],
# plus the system packages the tests use (mosquitto, espeak-ng, chromium, nodejs) if they are missing.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MEGACE_VENV:-.venv}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need_apt+=(nats-server)  # NATS MQTT broker and cluster tests
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need_apt+=(rabbitmq-server)  # RabbitMQ MQTT plugin in the broker matrix
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)  # the replicated cloud ledger's tests start their own cluster
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)   # the dashboard's browser test (Playwright drives it)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)  # runs the Node-RED example's function in a test
"$PY" -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)

install_system() {
  [ ${#need_apt[@]} -eq 0 ] && return 0
  echo "==> installing system packages: ${need_apt[*]}"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
}

setup() {
  install_system
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.megace-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "==> installing Python packages (torch 2.13.0 CPU first, then megace[all])"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q -e ".[all]"
    touch "$stamp"
  fi
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
}

cmd=${1:-help}
shift || true
case "$cmd" in
  run)  setup; exec "$VENV/bin/megace" run "$@" ;;
  # Workers: most tests wait on brokers, processes and timers, so 3 on 2 cores roughly thirds the wall time.
  # A test file runs on one worker (tests/conftest.py); MEGACE_TEST_WORKERS=0 runs in this process.
  test) setup; exec "$VENV/bin/python" -m pytest -n "${MEGACE_TEST_WORKERS:-3}" --dist loadfile "$@" ;;
  mutate) setup; exec "$VENV/bin/python" tools/mutate.py "$@" ;;
  setup) setup ;;
  *) echo "usage: ./dev.sh {run|test|mutate|setup} [args...]"; exit 2 ;;
esac
