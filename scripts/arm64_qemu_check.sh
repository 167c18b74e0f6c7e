#!/usr/bin/env bash
# Prove the Linux aarch64 (Raspberry Pi / Jetson CPU) install path under qemu-user emulation.
#
# Builds a Debian arm64 root with debootstrap, installs the edge client into a venv there
# from PyPI, then inside the emulated root runs `hetlora profile --quick --json` and a few
# local LoRA training steps of a tiny random-weight BERT, then federated rounds of `hetlora client`
# against `hetlora serve` on the host loopback (the chroot shares the host's network namespace):
# with the torch backend, and with WITH_EXECUTORCH=1 also with the executorch extra and
# ExecuTorch artifacts exported on the host.
#
# Not part of CI. Needs root on a Debian/Ubuntu x86_64 host, and network access to the
# Debian mirror and PyPI. Idempotent: every finished stage leaves a marker in the root and
# is skipped on the next run, so an interrupted run resumes where it stopped.
#
#   sudo scripts/arm64_qemu_check.sh [ROOT_DIR]          # default /var/tmp/hetlora-arm64
#
# Environment:
#   SUITE=bookworm  MIRROR=http://deb.debian.org/debian
#   TORCH_VERSION=2.10.0   torch release to install. The project pins 2.13.0, but PyPI's aarch64
#                          torch >= 2.11 is a CUDA 13 build: --no-deps fails at import (it preloads
#                          libcublasLt), and with its ~3 GB of NVIDIA wheels `import torch`
#                          segfaults under qemu-user 7.2 (Debian 12). 2.10.0 is PyPI's last CPU-only
#                          aarch64 build and runs here. docs/DEVICES.md, "Which torch wheel".
#   TORCH_INDEX_URL=       empty: PyPI; https://download.pytorch.org/whl/cpu: the CPU-only builds
#   PORT=8765              loopback port for the federated rounds
#   WITH_EXECUTORCH=0      1 adds the executorch extra and an ExecuTorch round; executorch 1.5.1
#                          needs torch 2.13 (with 2.10 its first forward_backward fails)
set -euo pipefail

PROJECT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=${1:-${ARM64_ROOT:-/var/tmp/hetlora-arm64}}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
TORCH_VERSION=${TORCH_VERSION:-2.10.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
PORT=${PORT:-8765}
WITH_EXECUTORCH=${WITH_EXECUTORCH:-0}
HOST_PYTHON=${HOST_PYTHON:-$PROJECT/.venv/bin/python}

APP=/opt/hetlora                 # inside the root
VENV=$APP/venv
SRC=$APP/src
WORK=$APP/work

say() { printf '\n=== %s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { printf 'arm64_qemu_check: %s\n' "$*" >&2; exit 1; }
# A command in the root with a clean environment; pip there trusts the host's CA bundle (copied
# in by mount_root, so TLS-intercepting proxies work) and uses the host's proxy, if any.
in_root() { chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin \
    LANG=C.UTF-8 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_CERT=/etc/ssl/host-ca-bundle.crt \
    ${https_proxy:+https_proxy=$https_proxy} ${http_proxy:+http_proxy=$http_proxy} \
    ${no_proxy:+no_proxy=$no_proxy} "$@"; }
done_marker() { [ -e "$ROOT/.hetlora-$1" ]; }
mark_done() { touch "$ROOT/.hetlora-$1"; }

host_prerequisites() {
    [ "$(id -u)" -eq 0 ] || die "run as root (debootstrap and chroot need it)"
    if ! command -v debootstrap >/dev/null || ! [ -x /usr/bin/qemu-aarch64-static ]; then
        say "installing debootstrap and qemu-user-static on the host"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap qemu-user-static binfmt-support
    fi
    if ! [ -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if ! [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        update-binfmts --enable qemu-aarch64 || die "cannot register qemu-aarch64 with binfmt_misc"
    fi
}

first_stage() {
    done_marker stage1 && return
    say "debootstrap --foreign $SUITE arm64 into $ROOT"
    mkdir -p "$ROOT"
    debootstrap --arch=arm64 --foreign --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates "$SUITE" "$ROOT" "$MIRROR"
    # With the binfmt "F" flag the host interpreter is enough; the copy serves hosts without it.
    cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
    mark_done stage1
}

mount_root() {
    for fs in proc sys dev; do
        mountpoint -q "$ROOT/$fs" && continue
        case $fs in
            proc) mount -t proc proc "$ROOT/proc" ;;
            sys) mount -t sysfs sysfs "$ROOT/sys" ;;
            dev) mount --bind /dev "$ROOT/dev" ;;
        esac
    done
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$ROOT/etc/ssl/host-ca-bundle.crt"
}

unmount_root() {
    for fs in dev sys proc; do
        if mountpoint -q "$ROOT/$fs"; then umount -l "$ROOT/$fs"; fi
    done
}

second_stage() {
    done_marker stage2 && return
    say "debootstrap second stage (emulated)"
    in_root /debootstrap/debootstrap --second-stage
    mark_done stage2
}

installed_torch() {
    in_root "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true
}

install_torch() {
    case $(installed_torch) in "$TORCH_VERSION"|"$TORCH_VERSION"+*) return ;; esac
    say "venv and torch==$TORCH_VERSION from ${TORCH_INDEX_URL:-PyPI}"
    [ -x "$ROOT$VENV/bin/python" ] || in_root python3 -m venv "$VENV"
    in_root "$VENV/bin/pip" install -q --upgrade pip
    in_root "$VENV/bin/pip" install "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
}

copy_source() {
    say "copying the project source to $SRC"
    rm -rf "$ROOT$SRC"
    mkdir -p "$ROOT$SRC"
    tar -C "$PROJECT" --exclude=.venv --exclude=.git --exclude='__pycache__' --exclude='*.egg-info' \
        --exclude=build --exclude=runs --exclude=.pytest_cache -cf - . | tar -C "$ROOT$SRC" -xf -
}

install_client() {
    say "pip install the client: the project with --no-deps, then the client extra minus torch"
    in_root "$VENV/bin/pip" install -q --no-deps "$SRC"
    in_root "$VENV/bin/python" "$SRC/deploy/client_requirements.py" --without torch > "$ROOT$APP/client-reqs.txt"
    cat "$ROOT$APP/client-reqs.txt"
    in_root "$VENV/bin/pip" install -q -r "$APP/client-reqs.txt"
    in_root "$VENV/bin/pip" list 2>/dev/null | grep -E -i '^(torch|transformers|safetensors|tokenizers|numpy|requests|psutil|tqdm|hetlora-edge) '
}

make_tiny_model() {
    # A 2-layer random-weight BERT with the default model's tokenizer, written by the host
    # into the root so that the host server and the emulated client read the same folder.
    [ -e "$ROOT$WORK/tiny-bert/config.json" ] && return
    say "writing a tiny random-weight BERT to $WORK/tiny-bert (host)"
    mkdir -p "$ROOT$WORK"
    "$HOST_PYTHON" - "$ROOT$WORK/tiny-bert" <<'PY'
import shutil, sys
from pathlib import Path
import torch
from transformers import BertConfig, BertModel
from hetlora.models.bundled import default_model_dir
out = Path(sys.argv[1])
torch.manual_seed(0)
BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)).save_pretrained(out)
for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if (default_model_dir() / name).exists():
        shutil.copy(default_model_dir() / name, out / name)
PY
}

report_platform() {
    say "emulated platform"
    in_root uname -m
    in_root "$VENV/bin/python" -c 'import platform, torch, transformers; print(platform.machine(), platform.python_version(), "torch", torch.__version__, "cuda built:", torch.backends.cuda.is_built(), "transformers", transformers.__version__)'
}

run_profile() {
    say "hetlora profile --quick --json (emulated)"
    in_root "$VENV/bin/hetlora" profile --quick --json
}

run_training_steps() {
    say "a few LoRA training steps of the tiny BERT (emulated, edge_client.lora)"
    in_root "$VENV/bin/python" - "$WORK/tiny-bert" <<'PY'
import sys, time
import torch
from transformers import AutoTokenizer, BertForSequenceClassification
from edge_client.lora import inject_lora, lora_layers
from hetlora.models.folders import default_targets
folder = sys.argv[1]
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
model = BertForSequenceClassification.from_pretrained(folder, num_labels=3, local_files_only=True)
for p in model.parameters():
    p.requires_grad_(False)
inject_lora(model, default_targets(folder), rank=4, alpha=8.0)
for p in model.classifier.parameters():
    p.requires_grad_(True)
texts = ["activate my card", "card payment declined", "exchange rate for euros", "top up failed"] * 4
labels = torch.tensor([0, 1, 2, 1] * 4)
batch = tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
trainable = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(trainable, lr=5e-3)
print(f"lora layers: {len(lora_layers(model))}, trainable params: {sum(p.numel() for p in trainable)}")
for step in range(5):
    start = time.perf_counter()
    loss = model(**batch, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.4f}  ({time.perf_counter() - start:.2f} s emulated)")
PY
}

# Two rounds of the tiny BERT with one client; $1 names the run, the rest are extra client options.
run_federated_round() {
    local name=$1 status=0 server
    shift
    say "federated rounds ($name): hetlora serve on the host at 127.0.0.1:$PORT, hetlora client emulated"
    head -n 65 "$PROJECT/hetlora/data/banking77/train.csv" > "$ROOT$WORK/train.csv"
    rm -rf "$ROOT$WORK/server-$name" "$ROOT$WORK/client-$name"
    (cd "$PROJECT" && exec "$HOST_PYTHON" -m hetlora.cli serve --host 127.0.0.1 --port "$PORT" \
        --model "$ROOT$WORK/tiny-bert" --state-dir "$ROOT$WORK/server-$name" --rounds 2 --min-clients 1 \
        --ranks 4,8 --local-steps 3 --batch-size 8 --seq-len 16) > "$ROOT$WORK/server-$name.log" 2>&1 &
    server=$!
    for _ in $(seq 120); do
        [ -e "$ROOT$WORK/server-$name/server.json" ] && break
        sleep 1
    done
    in_root "$VENV/bin/hetlora" client --server "http://127.0.0.1:$PORT" --data "$WORK/train.csv" \
        --state-dir "$WORK/client-$name" --model "$WORK/tiny-bert" --no-progress --give-up-after 600 "$@" \
        || status=$?
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    echo "client exit status: $status; server log:"
    grep -E "registered|accepted|aggregated|finished|ERROR" "$ROOT$WORK/server-$name.log" || true
    return "$status"
}

install_executorch() {
    say "pip install the executorch extra (emulated)"
    in_root "$VENV/bin/python" "$SRC/deploy/client_requirements.py" --extra executorch --without torch \
        > "$ROOT$APP/executorch-reqs.txt"
    in_root "$VENV/bin/pip" install -q -r "$APP/executorch-reqs.txt"
    in_root "$VENV/bin/python" -c 'import torch, executorch.extension.pybindings._C as t; print("executorch runtime:", t.__name__)'
}

export_artifacts() {
    say "hetlora export on the host: ExecuTorch training artifacts of the tiny BERT, ranks 4 and 8"
    rm -rf "$ROOT$WORK/artifacts"
    (cd "$PROJECT" && "$HOST_PYTHON" -m hetlora.cli export --model "$ROOT$WORK/tiny-bert" --task classification \
        --labels "$PROJECT/hetlora/data/banking77/categories.json" --ranks 4,8 --batch-size 8 --seq-len 16 \
        --backends executorch --out "$ROOT$WORK/artifacts" --no-progress)
}

# Runs one check, records PASS or FAIL for the summary, and carries on.
RESULTS=()
check() {
    local name=$1
    shift
    if "$@"; then RESULTS+=("PASS  $name"); else RESULTS+=("FAIL  $name (status $?)"); fi
}

main() {
    host_prerequisites
    first_stage
    trap unmount_root EXIT
    mount_root
    second_stage
    install_torch
    copy_source
    install_client
    make_tiny_model
    check "platform and versions" report_platform
    check "hetlora profile --quick --json" run_profile
    check "LoRA training steps" run_training_steps
    check "federated rounds, torch backend" run_federated_round torch --backend torch
    if [ "$WITH_EXECUTORCH" = 1 ]; then
        check "executorch extra installs and imports" install_executorch
        check "hetlora export on the host" export_artifacts
        check "federated rounds, executorch backend" \
            run_federated_round executorch --backend executorch --artifacts "$WORK/artifacts"
    fi
    say "summary"
    printf '%s\n' "${RESULTS[@]}"
    ! printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'
}

main "$@"
