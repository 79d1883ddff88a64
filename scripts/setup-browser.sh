#!/bin/sh
# Install Debian's chromium (headless browser for the report's page test) when it is missing.
# Idempotent: does nothing when `chromium` is already on PATH. Needs root for apt-get; as
# another user it says what to run and exits 0, and the browser test then skips with a reason.
set -eu

if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(command -v chromium)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "chromium is missing and this is not root: skipping" >&2
    echo "(as root: apt-get update && apt-get install -y --no-install-recommends chromium)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends chromium
echo "chromium installed: $(command -v chromium)"
