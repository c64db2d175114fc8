#!/usr/bin/env bash
# The control-plane demo on loopback: a controller, two enrolled agents, a grant, a
# revocation, and a lease that lapses when the controller dies. Every command it runs is
# printed, so it doubles as a tour. Cleans up on exit, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
NW=${NW:-target/release/nicwarden}
[[ -x $NW ]] || { echo "demo: $NW not built; run 'make demo'" >&2; exit 1; }

work=$(mktemp -d /tmp/nicwarden-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
AGENT_PORT=$(port); API_PORT=$(port); S1=$(port); S2=$(port)
export NICWARDEN_API=http://127.0.0.1:$API_PORT
export NICWARDEN_TOKEN_FILE=$work/ctl/operator.token
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; }
run() { show "$@"; "$@"; }
wait_for() { # wait_for DESCRIPTION SECONDS COMMAND...
  local what=$1 limit=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || { echo "demo: timed out waiting for $what" >&2; exit 1; }
    sleep 0.1
  done
}
status_has() { # status_has STATUS_ADDR PYTHON_EXPR (over `s`, the status document)
  "$NW" agent status --status-addr "$1" --json \
    | python3 -c "import json,sys; s=json.load(sys.stdin); sys.exit(0 if ($2) else 1)"
}
state_is() { # state_is STATUS_ADDR STATE: the egress scope is in STATE
  status_has "$1" "any(d['scope']['kind']=='egress' and d['state']=='$2' for d in s['scopes'])"
}

say "Start the controller (data dir $work/ctl)"
show "$NW" controller --data-dir "$work/ctl" --agent-listen 127.0.0.1:$AGENT_PORT --api-listen 127.0.0.1:$API_PORT "&"
"$NW" controller --data-dir "$work/ctl" --agent-listen 127.0.0.1:$AGENT_PORT --api-listen 127.0.0.1:$API_PORT 2>"$work/controller.log" &
pids+=($!); ctl_pid=$!
wait_for "controller" 20 curl -sf "$NICWARDEN_API/healthz"
echo "operator API: $NICWARDEN_API   metrics: $NICWARDEN_API/metrics   OpenAPI: $NICWARDEN_API/openapi.json"

say "Register two nodes; each gets a one-time join token"
T1=$("$NW" node add node1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["join_token"])')
T2=$("$NW" node add node2 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["join_token"])')
run "$NW" node list

say "Start two agents; they enroll with their tokens and open mTLS sessions"
for n in 1 2; do
  tok=T$n; st=S$n
  show "$NW" agent --node node$n --data-dir "$work/node$n" --controller https://127.0.0.1:$AGENT_PORT --token "<token>" --status-listen 127.0.0.1:${!st} --datapath none "&"
  "$NW" agent --node node$n --data-dir "$work/node$n" --controller https://127.0.0.1:$AGENT_PORT \
    --token "${!tok}" --status-listen 127.0.0.1:${!st} --datapath none 2>"$work/node$n.log" &
  pids+=($!)
done
wait_for "node1 connected" 20 status_has 127.0.0.1:$S1 "s['connected']"
wait_for "node2 connected" 20 status_has 127.0.0.1:$S2 "s['connected']"
run "$NW" agent status --status-addr 127.0.0.1:$S1

say "Grant node1 200 Mbit/s and node2 50 Mbit/s with a 200 MB volume (TTL 6 s, renewed every 2 s)"
run "$NW" lease grant node1 --rate 200Mbit --ttl 6s --renew 2s
run "$NW" lease grant node2 --rate 50Mbit --volume 200MB --ttl 6s --renew 2s
wait_for "node1 active" 10 state_is 127.0.0.1:$S1 active
wait_for "node2 active" 10 state_is 127.0.0.1:$S2 active
run "$NW" lease list
run "$NW" agent status --status-addr 127.0.0.1:$S1
run "$NW" agent status --status-addr 127.0.0.1:$S2

say "Revoke node1's lease: node1 falls to its floor (blocked) at once"
L1=$("$NW" lease list --node node1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
run "$NW" lease revoke "$L1" --reason "demo: operator revocation"
wait_for "node1 revoked" 5 state_is 127.0.0.1:$S1 revoked
run "$NW" agent status --status-addr 127.0.0.1:$S1

say "Kill the controller (kill -9): node2 keeps its lease until its own deadline, then falls to the floor"
run kill -9 $ctl_pid
wait_for "node2 disconnected" 10 status_has 127.0.0.1:$S2 "not s['connected']"
run "$NW" agent status --status-addr 127.0.0.1:$S2
wait_for "node2 expired" 15 state_is 127.0.0.1:$S2 expired
run "$NW" agent status --status-addr 127.0.0.1:$S2

# The controller counts a lapsed lease free only after its grace (1 s past the agent's own
# deadline, which started later, at receipt): wait that out so the restart sees it lapsed.
sleep 1.5
say "Restart the controller on the same data dir: state is intact (lease 2 lapsed, lease 1 revoked)"
show "$NW" controller --data-dir "$work/ctl" --agent-listen 127.0.0.1:$AGENT_PORT --api-listen 127.0.0.1:$API_PORT "&"
"$NW" controller --data-dir "$work/ctl" --agent-listen 127.0.0.1:$AGENT_PORT --api-listen 127.0.0.1:$API_PORT 2>>"$work/controller.log" &
pids+=($!)
wait_for "controller" 20 curl -sf "$NICWARDEN_API/healthz"
run "$NW" lease list
wait_for "node2 reconnected" 10 status_has 127.0.0.1:$S2 "s['connected']"
run "$NW" agent status --status-addr 127.0.0.1:$S2
run "$NW" audit verify
echo
echo "demo complete; cleaning up $work"
