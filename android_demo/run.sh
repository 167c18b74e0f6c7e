#!/usr/bin/env bash
# Train on this phone (Termux) as one client of a hetlora server, one round at a time,
# only while the battery is above a threshold or the phone is on power.
#
# Usage: bash android_demo/run.sh [--min-battery PCT] SERVER_URL [DATA_FILE]
#   SERVER_URL     e.g. http://192.168.1.20:8080 (the laptop running `hetlora serve --host 0.0.0.0`)
#   DATA_FILE      CSV or JSONL rows of text,label; default ~/hetlora/train.csv
#   --min-battery  percent below which training pauses unless charging; default
#                  $HETLORA_MIN_BATTERY or 30; 0 trains regardless and skips the battery check
# Environment: HETLORA_STATE_DIR (default ~/.hetlora/state), HETLORA_MODEL (a model folder;
#   default: the installed default model).
#
# Each round is one `hetlora client --max-rounds 1`; the battery is checked before every round,
# so a low battery stops training between rounds, never inside one. The state directory keeps
# the client's identity, so the next run.sh continues as the same client. Training is finished
# when a round ends without a new upload (the server said so). A wake lock (termux-wake-lock)
# is held from start to exit and always released, also on failure and Ctrl-C.
#
# Exit status: 0 training finished; 75 paused for the battery (run again when charged);
# 2 usage or battery-reading error; otherwise the client's own failure status.
set -euo pipefail

EXIT_PAUSED=75
MIN_BATTERY=${HETLORA_MIN_BATTERY:-30}
STATE_DIR=${HETLORA_STATE_DIR:-$HOME/.hetlora/state}

usage() {
    sed -n '5,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
}
fail() { printf 'run.sh: %s\n' "$*" >&2; exit 2; }
say() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

while [ $# -gt 0 ]; do
    case $1 in
        --min-battery) [ $# -ge 2 ] || usage; MIN_BATTERY=$2; shift 2 ;;
        --min-battery=*) MIN_BATTERY=${1#*=}; shift ;;
        -h|--help) usage ;;
        -*) fail "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] && [ $# -le 2 ] || usage
SERVER_URL=$1
DATA_FILE=${2:-$HOME/hetlora/train.csv}

case $SERVER_URL in
    http://?*|https://?*) ;;
    *) fail "SERVER_URL must look like http://192.168.1.20:8080, got '$SERVER_URL'" ;;
esac
case $MIN_BATTERY in
    ''|*[!0-9]*) fail "--min-battery takes a whole percent 0-100, got '$MIN_BATTERY'" ;;
esac
[ "$MIN_BATTERY" -le 100 ] || fail "--min-battery takes a whole percent 0-100, got '$MIN_BATTERY'"
[ -f "$DATA_FILE" ] || fail "no data file at $DATA_FILE: copy your train.csv there (see android_demo/README.md) or pass its path"

# Prints why the battery allows training or not; succeeds when it does.
# termux-battery-status JSON: percentage (0-100), plugged (UNPLUGGED, PLUGGED_AC, ...),
# status (CHARGING, DISCHARGING, FULL, NOT_CHARGING).
battery_allows_training() {
    [ "$MIN_BATTERY" -eq 0 ] && { echo "battery check off (--min-battery 0)"; return 0; }
    local reading
    reading=$(timeout 20 termux-battery-status) \
        || fail "cannot read the battery with termux-battery-status: install the Termux:API app and 'pkg install termux-api' (see android_demo/README.md), or pass --min-battery 0"
    printf '%s' "$reading" | python -c '
import json, sys
threshold = int(sys.argv[1])
try:
    battery = json.load(sys.stdin)
    percent = int(battery["percentage"])
except (ValueError, KeyError, TypeError) as exc:
    print(f"unreadable termux-battery-status output ({exc})")
    sys.exit(2)
plugged = str(battery.get("plugged") or "UNPLUGGED")
status = str(battery.get("status") or "UNKNOWN")
on_power = plugged != "UNPLUGGED" or status == "CHARGING"
state = f"battery {percent}%, {status.lower()}, {plugged.lower()}"
if on_power:
    print(f"{state}: on power, training")
elif percent >= threshold:
    print(f"{state}: at or above {threshold}%, training")
else:
    print(f"{state}: below {threshold}% and not charging, pausing")
    sys.exit(1)
' "$MIN_BATTERY"
}

# The last round this client uploaded, from its state directory (0 before the first).
last_uploaded_round() {
    python -c '
import json, sys
try:
    print(int(json.load(open(sys.argv[1])).get("last_uploaded_round") or 0))
except FileNotFoundError:
    print(0)
except (OSError, ValueError, AttributeError) as exc:
    sys.exit(f"run.sh: {sys.argv[1]} is damaged ({exc}); move it away to start as a new client")
' "$STATE_DIR/state.json"
}

release_wake_lock() { termux-wake-unlock || true; }

mkdir -p "$STATE_DIR"
termux-wake-lock
trap release_wake_lock EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "profiling this phone (hetlora profile --quick --json > $STATE_DIR/profile.json)"
hetlora profile --quick --json > "$STATE_DIR/profile.json"
python - "$STATE_DIR/profile.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
identity, cpu, memory = doc.get("identity") or {}, doc.get("cpu") or {}, doc.get("memory") or {}
battery = doc.get("battery") or {}
usable = memory.get("usable_bytes")
print(f"this device: {identity.get('model') or identity.get('platform', '?')} ({identity.get('arch', '?')}), "
      f"{cpu.get('cores', '?')} cores, {f'{usable / 1e9:.1f} GB' if usable else '? GB'} usable memory, "
      f"battery {battery.get('percent', '?')}%")
PY

client_args=(--server "$SERVER_URL" --data "$DATA_FILE" --state-dir "$STATE_DIR" --backend torch --max-rounds 1)
if [ -n "${HETLORA_MODEL:-}" ]; then client_args+=(--model "$HETLORA_MODEL"); fi

uploaded=$(last_uploaded_round)
while true; do
    set +e
    verdict=$(battery_allows_training)
    allowed=$?
    set -e
    say "$verdict"
    [ "$allowed" -le 1 ] || exit 2
    if [ "$allowed" -eq 1 ]; then
        say "paused: charge the phone or plug it in, then run this script again to continue"
        exit "$EXIT_PAUSED"
    fi
    hetlora client "${client_args[@]}"
    before=$uploaded
    uploaded=$(last_uploaded_round)
    if [ "$uploaded" = "$before" ]; then
        say "training finished: the server has no further rounds (last round uploaded: $uploaded)"
        exit 0
    fi
    say "round $uploaded uploaded"
done
