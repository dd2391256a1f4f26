#!/usr/bin/env bash
# Install Debian packages that are missing; do nothing when all are present.
# Usage: deploy/apt-install.sh PACKAGE...
# Needs root (or sudo). Used by `make` for build and test prerequisites.
set -euo pipefail

missing=()
for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
    echo "error: ${missing[*]} missing and this is not a Debian/Ubuntu system: install them by hand" >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null; then
    sudo=(sudo)
else
    echo "error: ${missing[*]} missing; run as root (or install sudo) so they can be installed" >&2
    exit 1
fi
echo "installing Debian packages: ${missing[*]}"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
