#!/usr/bin/env bash
# Vendor the dashboard's browser code from the npm registry into megace/dashboard/static/vendor/.
#
# The page must need nothing but the broker at run time (no CDN, no download), so the minified browser
# bundles are committed, with their licences and the exact versions and SHA-256 sums in VERSIONS.txt.
# Re-run to upgrade: bump the versions below, run, review the diff, commit.
set -euo pipefail

MQTT_VERSION="${MQTT_VERSION:-5.16.0}"
UPLOT_VERSION="${UPLOT_VERSION:-1.6.32}"

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/megace/dashboard/static/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$work"
npm pack --silent "mqtt@$MQTT_VERSION" "uplot@$UPLOT_VERSION" >/dev/null
mkdir mqtt uplot
tar -xzf "mqtt-$MQTT_VERSION.tgz" -C mqtt --strip-components=1
tar -xzf "uplot-$UPLOT_VERSION.tgz" -C uplot --strip-components=1

mkdir -p "$dest"
cp mqtt/dist/mqtt.min.js "$dest/mqtt.min.js"
cp mqtt/LICENSE.md "$dest/mqtt.LICENSE.md"
cp uplot/dist/uPlot.iife.min.js "$dest/uPlot.iife.min.js"
cp uplot/dist/uPlot.min.css "$dest/uPlot.min.css"
cp uplot/LICENSE "$dest/uPlot.LICENSE"

{
  echo "# vendored by tools/vendor_dashboard.sh from the npm registry (npm pack); do not edit by hand"
  echo "mqtt@$MQTT_VERSION"
  echo "uplot@$UPLOT_VERSION"
  (cd "$dest" && sha256sum mqtt.min.js uPlot.iife.min.js uPlot.min.css)
} > "$dest/VERSIONS.txt"
echo "vendored mqtt@$MQTT_VERSION and uplot@$UPLOT_VERSION into $dest"
