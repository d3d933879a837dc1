#!/usr/bin/env bash
# The main job on embedded defaults (local Mosquitto, SQLite), from nothing:
#   1. set up .venv (scripts/setup.sh) and make sure a local broker runs (scripts/services.sh);
#   2. package the digits CNN for the `cpu` profile (int8, validated, benchmarked, signed), and a 1.1.0 for deploying;
#   3. create the dashboard database and an admin user; upload both packages;
#   4. install 1.0.0 on a local agent and start it (KServe v2 API on 127.0.0.1:8470), an ingest process,
#      a little inference traffic, and the dashboard on http://127.0.0.1:8080 (Ctrl-C stops everything).
# Options: --smoke  start everything, wait until the dashboard shows the device online with telemetry, then stop.
# Environment: EDGEOPT_DEMO_DIR (default ./demo-state), EDGEOPT_DEMO_WEB_PORT (8080), EDGEOPT_DEMO_API_PORT (8470),
#              EDGEOPT_DEMO_BROKER (mqtt://127.0.0.1:1883), EDGEOPT_DEMO_PASSWORD (edgeopt-demo).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
smoke=0
[[ "${1:-}" == "--smoke" ]] && smoke=1

EDGEOPT_SETUP_BROWSER=0 scripts/setup.sh
scripts/services.sh
source .venv/bin/activate

D=$(realpath -m "${EDGEOPT_DEMO_DIR:-demo-state}")
WEB_PORT=${EDGEOPT_DEMO_WEB_PORT:-8080}
API_PORT=${EDGEOPT_DEMO_API_PORT:-8470}
BROKER=${EDGEOPT_DEMO_BROKER:-mqtt://127.0.0.1:1883}
PASSWORD=${EDGEOPT_DEMO_PASSWORD:-edgeopt-demo}
mkdir -p "$D/logs"
export EDGEOPT_DATABASE_URL="sqlite:///$D/dashboard.db"
export EDGEOPT_INSTANCE_DIR="$D/dashboard"
export EDGEOPT_TRUSTED_KEYS="$D/keys/edgeopt.pub"
export EDGEOPT_BROKER_URL="$BROKER"
export EDGEOPT_FLEET=demo
export EDGEOPT_PUBLIC_URL="http://127.0.0.1:$WEB_PORT"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

[[ -f "$D/keys/edgeopt.key" ]] || { step "signing key"; edgeopt keygen --out "$D/keys"; }

digits=tests/assets/digits
for v in 1.0.0 1.1.0; do
  pkg="$D/digits-cpu-$v.eopkg"
  if [[ ! -f $pkg ]]; then
    step "edgeopt package digits_cnn.onnx --profile cpu (version $v)"
    edgeopt package "$digits/digits_cnn.onnx" --profile cpu --calib "$digits/digits_calib.npz" \
      --heldout "$digits/digits_heldout.npz" --sign-key "$D/keys/edgeopt.key" --name digits --version "$v" -o "$pkg"
  fi
done
edgeopt inspect "$D/digits-cpu-1.0.0.eopkg"

step "dashboard database, admin user, packages"
edgeopt-dashboard init-db
edgeopt-dashboard create-user admin --role admin --password "$PASSWORD" >/dev/null 2>&1 \
  || edgeopt-dashboard create-user admin --role admin --password "$PASSWORD" --update >/dev/null
token=$(edgeopt-dashboard create-token admin --name demo | tail -n 1)

step "agent demo-01 (state in $D/agent)"
# The agent takes commands signed by the dashboard's key only, and downloads only from its package store.
command_pub=$(edgeopt-dashboard command-key)
edgeopt agent init --device-id demo-01 --fleet demo --broker "$BROKER" --state-dir "$D/agent" \
  --api-port "$API_PORT" --trust-key "$D/keys/edgeopt.pub" --telemetry-interval 2 --group demo-line \
  --command-key "$command_pub" --package-url "$EDGEOPT_PUBLIC_URL/dl/" > "$D/agent.toml"
edgeopt agent list --config "$D/agent.toml" --json | grep -q '"digits"' \
  || edgeopt agent install "$D/digits-cpu-1.0.0.eopkg" --config "$D/agent.toml"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

edgeopt-agent --config "$D/agent.toml" > "$D/logs/agent.log" 2>&1 & pids+=($!)
edgeopt-dashboard ingest --broker "$BROKER" --rollup-every 10 > "$D/logs/ingest.log" 2>&1 & pids+=($!)
edgeopt-dashboard serve --port "$WEB_PORT" > "$D/logs/web.log" 2>&1 & pids+=($!)
python scripts/demo_traffic.py --url "http://127.0.0.1:$API_PORT" --model digits \
  --data "$digits/digits_heldout.npz" > "$D/logs/traffic.log" 2>&1 & pids+=($!)

python - "$WEB_PORT" "$token" "$D" <<'PY'
import json, sys, time, urllib.request
port, token, d = sys.argv[1], sys.argv[2], sys.argv[3]
def get(path):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)
deadline = time.time() + 90
last = "dashboard not answering yet"
while time.time() < deadline:
    try:
        dev = get("/api/v1/devices/demo-01")
        if dev.get("status") == "online" and dev.get("p95_ms") is not None:
            print(f"dashboard: demo-01 online, p95 {dev['p95_ms']} ms, packages {dev['packages']}")
            break
        last = f"device status {dev.get('status')!r}, waiting for telemetry"
    except Exception as exc:  # not up yet
        last = f"{exc.__class__.__name__}: {exc}"
    time.sleep(1)
else:
    sys.exit(f"error: dashboard never showed demo-01 with telemetry ({last}); see {d}/logs/")
PY

python scripts/demo_upload.py --url "http://127.0.0.1:$WEB_PORT" --token "$token" \
  "$D/digits-cpu-1.0.0.eopkg" "$D/digits-cpu-1.1.0.eopkg"

cat <<EOT

edgeopt demo is running:
  dashboard   http://127.0.0.1:$WEB_PORT   (user admin, password $PASSWORD)
  agent API   http://127.0.0.1:$API_PORT/v2/models/digits   (KServe v2; POST .../infer)
  broker      $BROKER      logs and state in $D/
Deploy digits 1.1.0 to demo-01 from the Deployments page, or: edgeopt agent list --config $D/agent.toml
EOT
if [[ $smoke == 1 ]]; then
  echo "smoke run: everything answered; stopping."
  exit 0
fi
echo "Ctrl-C stops the agent, the ingest process, the traffic and the dashboard."
wait "${pids[2]}"
