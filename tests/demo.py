#!/usr/bin/python3
"""make demo: imdsd's main job end to end on this machine.

Generates a test CA and a stand-in Entra token endpoint over real TLS (tests/integration/
fake_entra.py), writes a projected service-account token the way the kubelet lays it out,
starts build/imdsd against them and fetches an access token with curl, exactly as an
application would call Azure IMDS."""
import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_ID = "00000000-0000-0000-0000-00000000c1d0"
TENANT = "ok"


def b64(obj):
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def write_projected_token(root):
    """Kubelet atomic-writer layout: ..<timestamp>/file, ..data -> ..<timestamp>, file -> ..data/file."""
    now = int(time.time())
    claims = {"aud": ["api://AzureADTokenExchange"], "iss": "https://oidc.demo.invalid/",
              "sub": "system:serviceaccount:demo:app", "iat": now, "nbf": now, "exp": now + 3600}
    jwt = b64({"alg": "RS256", "kid": "demo"}) + "." + b64(claims) + "." + b64({"sig": "demo"})
    ts = time.strftime("..%Y_%m_%d_%H_%M_%S.000000001", time.gmtime())
    os.makedirs(os.path.join(root, ts))
    with open(os.path.join(root, ts, "azure-identity-token"), "w") as f:
        f.write(jwt)
    os.symlink(ts, os.path.join(root, "..data"))
    os.symlink("..data/azure-identity-token", os.path.join(root, "azure-identity-token"))
    return os.path.join(root, "azure-identity-token")


def wait_file(path, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return open(path).read().strip()
        time.sleep(0.05)
    raise SystemExit("demo: timed out waiting for " + path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="build/imdsd")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="imdsd-demo-")
    procs = []
    try:
        subprocess.run([os.path.join(HERE, "integration", "gen_certs.sh"), tmp], check=True,
                       stdout=subprocess.DEVNULL)
        token_file = write_projected_token(os.path.join(tmp, "token"))
        ready = os.path.join(tmp, "entra.port")
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "integration", "fake_entra.py"),
             "--cert", os.path.join(tmp, "leaf.pem"), "--key", os.path.join(tmp, "leaf.key"),
             "--port", "0", "--log", os.path.join(tmp, "entra.jsonl"), "--ready-file", ready,
             "--token-file", token_file]))
        port = wait_file(ready)
        print(f"demo: stand-in Entra on https://localhost:{port}/ (test CA {tmp}/ca.pem)")
        listen = "127.0.0.1:18000"
        cmd = [args.binary, "--listen", listen, "--client-id", CLIENT_ID, "--tenant-id", TENANT,
               "--token-file", token_file, "--authority-host", f"https://localhost:{port}/",
               "--ca-file", os.path.join(tmp, "ca.pem")]
        print("demo: starting", " ".join(cmd))
        procs.append(subprocess.Popen(cmd))
        url = f"http://{listen}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net"
        for _ in range(100):
            if subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://{listen}/healthz"]).returncode == 0:
                break
            time.sleep(0.05)
        curl = ["curl", "-sS", "--fail-with-body", "-H", "Metadata: true", url]
        print("demo: $", " ".join(curl[:-1]), "'" + url + "'")
        out = subprocess.run(curl, capture_output=True, text=True)
        print(out.stdout or out.stderr)
        if out.returncode != 0:
            raise SystemExit("demo: the token request failed")
        body = json.loads(out.stdout)
        print(f"demo: got a {body['token_type']} token for {body['resource']}, "
              f"expires in {body['expires_in']} s (on {body['expires_on']})")
        return 0
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
