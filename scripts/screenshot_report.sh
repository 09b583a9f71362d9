#!/usr/bin/env bash
# Render the Snakemake HTML report in headless Chromium (Debian package `chromium`) and save a
# screenshot, to check the page renders: scripts/screenshot_report.sh [report.html] [out.png]
set -euo pipefail
report=$(realpath "${1:-results/report.html}")
shot=$(realpath -m "${2:-results/report.png}")
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
command -v chromium >/dev/null || { echo "install Debian's chromium: apt-get install chromium" >&2; exit 2; }
# The report is a single-page app: give its scripts time to draw before the screenshot.
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --window-size=1400,1000 --virtual-time-budget=10000 \
  --screenshot="$shot" "file://$report" 2>/dev/null
echo "screenshot: $shot"
