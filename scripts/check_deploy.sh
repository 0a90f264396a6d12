#!/usr/bin/env bash
# Check the deployment before applying it: the gateway configs (check-config --strict),
# both kustomize overlays (build, Kubernetes schema validation, probes, ports, hardening,
# shutdown timeline), the alert rules and dashboard (promtool), the Dockerfile (hadolint)
# and compose.yaml (Compose Specification schema). The checks are the tests of
# tests/deploy; a missing tool (kubectl, promtool, hadolint) is reported as a skip.
#
#   scripts/check_deploy.sh            quick checks (no build replay)
#   scripts/check_deploy.sh --all      also replays the Dockerfile's build stage (~15-60 s)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
marker=(-m "not slow")
if [[ "${1:-}" == "--all" ]]; then
    marker=()
    shift
fi
exec "$python" -m pytest -q -p no:cacheprovider -rs tests/deploy "${marker[@]}" "$@"
