"""harness_http.py - HTTP client helpers: requests to the daemon and checks of its IMDS answers.

request()/get_token() go through http.client (optionally from inside a network namespace);
raw_exchange() and the parse/split helpers work on raw bytes for the protocol tests; assert_token_ok()
and assert_json_error() check the IMDS response shapes. Timeouts scale with harness_base.SCALE.
"""
import http.client, json, re, socket, time, urllib.parse

import harness_base as base
from harness_base import CLIENT_ID, JSON_CT, RESOURCE, TOKEN_PATH
from harness_netns import in_netns

IMDS_FIELDS = ["access_token", "client_id", "expires_in", "expires_on", "ext_expires_in", "not_before",
               "resource", "token_type"]


# ---- HTTP helpers -------------------------------------------------------------------------------

class Resp:
    def __init__(self, status, headers, body):
        self.status, self.body = status, body
        self.headers = {k.lower(): v for k, v in headers}
        self.header_list = headers
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None

    def __repr__(self):
        return f"<{self.status} {self.body[:300]!r}>"


def request(port, path, headers=None, method="GET", body=None, host="127.0.0.1", timeout=10, conn=None,
            netns=None):
    """One request with http.client (on conn if given, so keep-alive can be tested). Returns Resp.
    With netns (a NetNS or its name), the request is made from inside that network namespace."""
    if netns is not None:
        return in_netns(netns, request, port, path, headers, method, body, host, timeout, conn)
    c = conn or http.client.HTTPConnection(host, port, timeout=timeout * base.SCALE)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return Resp(r.status, r.getheaders(), r.read())
    finally:
        if conn is None:
            c.close()


def token_url(resource=RESOURCE, client_id=None, api_version="2018-02-01", path=TOKEN_PATH, extra=""):
    q = []
    if api_version is not None:
        q.append("api-version=" + api_version)
    if resource is not None:
        q.append("resource=" + urllib.parse.quote(resource, safe=""))
    if client_id is not None:
        q.append("client_id=" + urllib.parse.quote(client_id, safe=""))
    return path + "?" + "&".join(q) + extra


def get_token(port, resource=RESOURCE, client_id=None, headers=None, conn=None, timeout=20, netns=None, **kw):
    h = {"Metadata": "true"} if headers is None else headers
    return request(port, token_url(resource, client_id, **kw), h, conn=conn, timeout=timeout, netns=netns)


def raw_exchange(port, data, timeout=5, host="127.0.0.1", one_response=False):
    """Sends raw bytes, then reads until the peer closes or timeout (or, with one_response, until one
    complete response arrived). Returns (bytes received, closed): closed means EOF or reset was seen."""
    s = socket.create_connection((host, port), timeout=timeout * base.SCALE)
    got, closed = b"", False
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        deadline = time.monotonic() + timeout * base.SCALE
        while not closed and time.monotonic() < deadline:
            if one_response and complete_response(got):
                break
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                b = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not b:
                closed = True
                break
            got += b
    finally:
        s.close()
    return got, closed


def raw_get(path=None):
    """A complete GET request for path (default: the token for RESOURCE) with Metadata: true, as bytes."""
    return f"GET {path or token_url()} HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\n\r\n".encode()


def complete_response(data):
    r = parse_raw(data)
    return r is not None and len(r.body) >= int(r.headers.get("content-length", "0") or 0)


def parse_raw(data):
    """Parses the first HTTP response in data -> Resp (or None if there is none)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    m = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    if not m:
        return None
    headers = [tuple(x.strip() for x in l.split(":", 1)) for l in lines[1:] if ":" in l]
    cl = dict((k.lower(), v) for k, v in headers).get("content-length", "")
    n = int(cl) if cl.isdigit() else len(rest)
    return Resp(int(m.group(1)), headers, rest[:n])


def split_responses(data):
    """All complete HTTP responses in data, in order."""
    out = []
    while data:
        r = parse_raw(data)
        if r is None:
            break
        head = data.index(b"\r\n\r\n") + 4
        n = int(r.headers.get("content-length", "0"))
        if len(data) < head + n:
            break
        out.append(r)
        data = data[head + n:]
    return out, data


def read_responses(sock, count, timeout):
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        rs, _ = split_responses(data)
        if len(rs) >= count:
            return rs, data
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            b = sock.recv(65536)
        except socket.timeout:
            break
        if not b:
            break
        data += b
    return split_responses(data)[0], data


def assert_json_error(r, status, error=None, desc=None):
    """The IMDS error shape: status, JSON content type, string error + error_description."""
    assert r.status == status, f"want {status}, got {r!r}"
    assert r.headers.get("content-type") == JSON_CT, f"Content-Type {r.headers.get('content-type')!r}"
    assert isinstance(r.json, dict), f"error body is not a JSON object: {r.body[:200]!r}"
    assert isinstance(r.json.get("error"), str) and r.json["error"], f"no string 'error': {r.json}"
    assert isinstance(r.json.get("error_description"), str), f"no string 'error_description': {r.json}"
    assert "access_token" not in r.json, "error body carries an access_token"
    if error is not None:
        assert r.json["error"] == error, f"error {r.json['error']!r}, want {error!r}"
    if desc is not None:
        assert desc in r.json["error_description"], f"{desc!r} not in {r.json['error_description']!r}"
    return r.json


def assert_token_ok(r, resource=RESOURCE, client_id=CLIENT_ID):
    """The IMDS 200 shape: every field a string, integers where integers are expected."""
    assert r.status == 200, f"want 200, got {r!r}"
    assert r.headers.get("content-type") == JSON_CT, f"Content-Type {r.headers.get('content-type')!r}"
    j = r.json
    assert isinstance(j, dict), f"body is not JSON: {r.body[:200]!r}"
    assert sorted(j) == IMDS_FIELDS, f"fields {sorted(j)}, want {IMDS_FIELDS}"
    for k, v in j.items():
        assert isinstance(v, str), f"{k} is {type(v).__name__} {v!r}, not a string"
    for k in ("expires_in", "expires_on", "ext_expires_in", "not_before"):
        assert re.fullmatch(r"[0-9]+", j[k]), f"{k}={j[k]!r} is not a decimal integer string"
    assert j["token_type"] == "Bearer", j["token_type"]
    assert j["resource"] == resource, f"resource {j['resource']!r}, want {resource!r}"
    if client_id is not None:
        assert j["client_id"] == client_id, f"client_id {j['client_id']!r}, want {client_id!r}"
    assert j["access_token"], "empty access_token"
    return j
