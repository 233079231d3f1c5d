#!/usr/bin/python3
"""connect_proxy.py - a small HTTP CONNECT proxy for the integration tests (stdlib only, threads).

Accepts CONNECT host:port (IPv6 hosts in brackets), checks Proxy-Authorization when asked to,
connects to the target and relays bytes both ways until either side closes. Anything else than
CONNECT gets 405. Every CONNECT appends one JSON line to --log, written before the answer is sent:

  {"ts": 1764331200.123, "conn": 1, "client": "127.0.0.1:40000", "target": "localhost:8443",
   "host": "localhost", "port": 8443, "host_header": "localhost:8443", "auth": "ok",
   "auth_header": true, "status": 200, "error": null}

auth is "ok" (the credentials match --require-auth), "missing", "wrong", "malformed", or
"not_required" (no --require-auth). The credentials themselves are never logged.

  --port N              listen port (0 = any; the port is written to --ready-file)
  --bind ADDR           listen address (default 127.0.0.1)
  --ready-file F        written (atomically) with the port once listening
  --log F               the JSON lines
  --require-auth U:P    answer 407 unless Proxy-Authorization is Basic base64(U:P)
  --refuse STATUS       answer every CONNECT with STATUS (e.g. 403, 407, 502) and close; or
                        "close" to close the connection without answering
"""
import argparse, base64, binascii, json, os, select, socket, sys, threading, time
from socketserver import BaseRequestHandler, ThreadingTCPServer

HEAD_MAX = 16384        # bytes of a CONNECT request head
HEAD_TIMEOUT_S = 10     # to receive it
CONNECT_TIMEOUT_S = 5   # to reach the target
RELAY_CHUNK = 65536
REASONS = {200: "Connection established", 400: "Bad Request", 403: "Forbidden",
           405: "Method Not Allowed", 407: "Proxy Authentication Required", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}

LOCK = threading.Lock()
COUNTER = {"conn": 0}


def parse_target(target):
    """'host:port' or '[v6]:port' -> (host, port), or None."""
    if target.startswith("["):
        close = target.find("]")
        if close < 0 or target[close + 1:close + 2] != ":":
            return None
        host, port = target[1:close], target[close + 2:]
    else:
        host, sep, port = target.rpartition(":")
        if not sep or ":" in host:
            return None
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


def check_auth(value, required):
    if required is None:
        return "not_required"
    if value is None:
        return "missing"
    scheme, _, b64 = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return "malformed"
    try:
        creds = base64.b64decode(b64.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return "malformed"
    return "ok" if creds == required else "wrong"


class Handler(BaseRequestHandler):
    def setup(self):
        with LOCK:
            COUNTER["conn"] += 1
            self.conn_id = COUNTER["conn"]

    def log(self, **fields):
        line = {"ts": round(time.time(), 3), "conn": self.conn_id,
                "client": "%s:%d" % self.client_address[:2]}
        line.update(fields)
        with LOCK, open(self.server.log_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def answer(self, status, extra=""):
        reason = REASONS.get(status, "Refused")
        body = b"" if status == 200 else f"{status} {reason}\n".encode()
        head = f"HTTP/1.1 {status} {reason}\r\n{extra}"
        if status != 200:
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n"
        try:
            self.request.sendall(head.encode() + b"\r\n" + body)
        except OSError:
            pass

    def read_head(self):
        data = b""
        self.request.settimeout(HEAD_TIMEOUT_S)
        while b"\r\n\r\n" not in data:
            if len(data) > HEAD_MAX:
                return None, b""
            try:
                chunk = self.request.recv(4096)
            except OSError:
                return None, b""
            if not chunk:
                return None, b""
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        self.request.settimeout(None)
        return head.decode("latin-1"), rest

    def handle(self):
        head, early = self.read_head()
        if head is None:
            return
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        method = parts[0] if parts else ""
        target = parts[1] if len(parts) == 3 else ""
        fields = {"method": method, "target": target, "host_header": headers.get("host"),
                  "auth_header": "proxy-authorization" in headers,
                  "auth": check_auth(headers.get("proxy-authorization"), self.server.require_auth)}
        if method != "CONNECT" or len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self.log(**fields, status=405 if len(parts) == 3 else 400, error="not a CONNECT request")
            self.answer(405 if len(parts) == 3 else 400)
            return
        hp = parse_target(target)
        fields.update(host=hp[0] if hp else None, port=hp[1] if hp else None)
        if hp is None:
            self.log(**fields, status=400, error="bad target")
            self.answer(400)
            return
        if self.server.refuse == "close":
            self.log(**fields, status=None, error="closed without answering (--refuse close)")
            return
        if self.server.refuse is not None:
            self.log(**fields, status=self.server.refuse, error="refused (--refuse)")
            self.answer(self.server.refuse)
            return
        if fields["auth"] not in ("ok", "not_required"):
            self.log(**fields, status=407, error=f"authentication {fields['auth']}")
            self.answer(407, 'Proxy-Authenticate: Basic realm="connect_proxy"\r\n')
            return
        try:
            upstream = socket.create_connection(hp, timeout=CONNECT_TIMEOUT_S)
        except OSError as e:
            self.log(**fields, status=502, error=f"cannot connect: {e}")
            self.answer(502)
            return
        upstream.settimeout(None)
        self.log(**fields, status=200, error=None)
        self.answer(200)
        try:
            if early:
                upstream.sendall(early)
            self.relay(self.request, upstream)
        finally:
            upstream.close()

    @staticmethod
    def relay(a, b):
        peers = {a: b, b: a}
        while True:
            ready, _, _ = select.select(list(peers), [], [])
            for s in ready:
                try:
                    chunk = s.recv(RELAY_CHUNK)
                except OSError:
                    return
                if not chunk:
                    return
                try:
                    peers[s].sendall(chunk)
                except OSError:
                    return


class Server(ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--ready-file")
    ap.add_argument("--log", required=True)
    ap.add_argument("--require-auth", metavar="USER:PASS")
    ap.add_argument("--refuse", metavar="STATUS")
    a = ap.parse_args()
    if a.require_auth is not None and ":" not in a.require_auth:
        ap.error("--require-auth wants USER:PASS")
    refuse = a.refuse
    if refuse is not None and refuse != "close":
        if not refuse.isdigit() or not 100 <= int(refuse) <= 599:
            ap.error("--refuse wants an HTTP status or 'close'")
        refuse = int(refuse)
    family = socket.AF_INET6 if ":" in a.bind else socket.AF_INET
    Server.address_family = family
    srv = Server((a.bind, a.port), Handler)
    srv.log_path, srv.require_auth, srv.refuse = a.log, a.require_auth, refuse
    open(a.log, "a").close()
    if a.ready_file:
        with open(a.ready_file + ".tmp", "w") as f:
            f.write(f"{srv.server_address[1]}\n")
        os.rename(a.ready_file + ".tmp", a.ready_file)
    print(f"connect_proxy: listening on {a.bind}:{srv.server_address[1]}", file=sys.stderr, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
