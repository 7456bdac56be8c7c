#!/usr/bin/env bash
# Makes sure the tools the tests drive are here, from Debian's packages, installing what is
# missing: Chromium and ChromeDriver (packages chromium and chromium-driver: the console test)
# and libfaketime (package faketime: the clock-skew tests run real binaries with their wall
# clock a minute off), promtool (package prometheus: the alert rules' unit tests and the
# shipped configuration are checked with it); and from PyPI openapi-spec-validator (every /openapi.json is checked
# with a real OpenAPI validator).
set -euo pipefail

OPENAPI_VALIDATOR=openapi-spec-validator==0.9.0
if ! python3 -m openapi_spec_validator --version 2>/dev/null | grep -q "0.9.0"; then
  echo "test-tools: installing $OPENAPI_VALIDATOR (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check "$OPENAPI_VALIDATOR" 2>&1 |
    grep -v "Running pip as the 'root' user" || true
  python3 -m openapi_spec_validator --version >/dev/null ||
    { echo "test-tools: openapi-spec-validator missing after install" >&2; exit 1; }
fi

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || need+=(faketime)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0
echo "test-tools: installing ${need[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "test-tools: need root (or sudo) to install ${need[*]}" >&2; exit 1; }
  sudo="sudo"
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
command -v chromedriver >/dev/null 2>&1 || { echo "test-tools: chromedriver missing after install" >&2; exit 1; }
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || { echo "test-tools: libfaketime missing after install" >&2; exit 1; }
command -v promtool >/dev/null 2>&1 || { echo "test-tools: promtool missing after install" >&2; exit 1; }
