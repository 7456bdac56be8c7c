#!/usr/bin/env bash
# Makes sure the console test's browser is here: Debian's Chromium and ChromeDriver
# (packages chromium and chromium-driver), installed when missing.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
echo "browser: installing chromium and chromium-driver (the console test drives them)"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "browser: need root (or sudo) to install chromium" >&2; exit 1; }
  sudo="sudo"
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
command -v chromedriver >/dev/null 2>&1 || { echo "browser: chromedriver missing after install" >&2; exit 1; }
