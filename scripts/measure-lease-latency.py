#!/usr/bin/env python3
"""Measures control-plane latency on loopback: operator grant -> agent reports the lease
active, and operator revoke -> agent at its floor. Starts its own controller and agent (the
release binary) in a temporary directory and stops them at the end.

Usage: scripts/measure-lease-latency.py [ROUNDS]   (default 20; build with `make build`)
"""
import json, os, socket, subprocess, sys, tempfile, time, urllib.request

NW = os.environ.get("NW", "target/release/nicwarden")
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 20


def port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait(what, pred, limit=20.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.01)
    sys.exit(f"timed out waiting for {what}")


def main():
    work = tempfile.mkdtemp(prefix="nicwarden-latency.")
    ap, hp, sp = port(), port(), port()
    api = f"http://127.0.0.1:{hp}"
    procs = []
    try:
        procs.append(subprocess.Popen([NW, "controller", "--data-dir", f"{work}/ctl",
                                       "--agent-listen", f"127.0.0.1:{ap}", "--api-listen", f"127.0.0.1:{hp}"],
                                      stderr=subprocess.DEVNULL))
        wait("controller", lambda: urllib.request.urlopen(f"{api}/healthz").status == 200)
        tok = open(f"{work}/ctl/operator.token").read().strip()

        def call(method, path, body=None):
            req = urllib.request.Request(api + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Authorization": "Bearer " + tok,
                                                  "Content-Type": "application/json"})
            return json.load(urllib.request.urlopen(req))

        join = call("POST", "/v1/nodes", {"name": "n1"})["join_token"]
        procs.append(subprocess.Popen([NW, "agent", "--node", "n1", "--data-dir", f"{work}/n1",
                                       "--controller", f"https://127.0.0.1:{ap}", "--token", join,
                                       "--status-listen", f"127.0.0.1:{sp}", "--datapath", "none"],
                                      stderr=subprocess.DEVNULL))

        def status():
            return json.load(urllib.request.urlopen(f"http://127.0.0.1:{sp}/status"))

        def egress():
            return [d for d in status()["scopes"] if d["scope"]["kind"] == "egress"][0]["state"]

        wait("agent connected", lambda: status()["connected"])
        grants, revokes = [], []
        for _ in range(ROUNDS):
            t0 = time.monotonic()
            lease = call("POST", "/v1/leases", {"node": "n1", "rate_bps": 1_000_000})
            wait("active", lambda: egress() == "active", 5)
            grants.append(time.monotonic() - t0)
            t0 = time.monotonic()
            call("POST", f"/v1/leases/{lease['id']}/revoke", {})
            wait("revoked", lambda: egress() == "revoked", 5)
            revokes.append(time.monotonic() - t0)
        for name, xs in (("grant  -> agent active ", grants), ("revoke -> agent at floor", revokes)):
            xs.sort()
            print(f"{name}: median {xs[len(xs) // 2] * 1000:.1f} ms, max {xs[-1] * 1000:.1f} ms over {len(xs)} rounds")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
