#!/usr/bin/env bash
# Install Debian's chromium for the collection app's browser test, when it is missing (CI runs as root
# on a Debian machine). Playwright drives this system browser; it downloads no browser of its own.
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq chromium >&2
fi
test -x /usr/bin/chromium
