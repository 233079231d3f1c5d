"""Secrets never reach the log: not the service-account token, not any access token, at debug level;
and no copy of the service-account token stays in the daemon's memory or registers."""
import ctypes, os, platform, re, select, socket, threading, time

import harness
from harness import Skip, assert_token_ok, get_token, request, wait_for


def windows(jwt, size=24, step=12):
    """Every 24-character slice (step 12) of the payload and signature: catches partial leaks too.
    The JWT header is not secret (every fake token shares it), so it is skipped."""
    for part in jwt.split(".")[1:]:
        for i in range(0, max(1, len(part) - size + 1), step):
            yield part[i:i + size]


def test_no_secrets_in_log_at_debug(ctx):
    tenant = ctx.tenant("ok")
    d = ctx.daemon(tenant, log_level="debug")
    sa_tokens = [d.token.content]
    assert_token_ok(get_token(d.port))
    assert_token_ok(get_token(d.port))                                   # cached hit
    ctx.fake.control(tenant, script=["aadsts-700016"])
    get_token(d.port, "https://vault.azure.net")                         # Entra error path
    ctx.fake.control(tenant, script=["garbage"])
    get_token(d.port, "https://storage.azure.com/")                      # unparseable answer
    sa_tokens.append(d.token.rotate())
    assert_token_ok(get_token(d.port, "https://database.windows.net/"), resource="https://database.windows.net/")
    get_token(d.port, headers={})
    request(d.port, "/readyz")
    d.stop()
    log = d.log()
    assert log.strip(), "nothing logged at --log-level debug"
    issued = [r["access_token"] for r in ctx.fake.records(tenant) if r["access_token"]]
    assert len(issued) >= 2
    for what, secrets in (("service-account token", sa_tokens), ("access token", issued)):
        for s in secrets:
            assert s not in log, f"a whole {what} appears in the daemon log"
            for w in windows(s):
                assert w not in log, f"part of a {what} ({w!r}) appears in the daemon log"


def memory_of(pid, max_region=1 << 30):
    """The writable private memory of process pid (heap, anonymous mappings, every thread's stack), as
    (maps line, bytes) per region. Regions over max_region are skipped: under ASan those are the
    sanitizer's shadow, reserved address space that holds no data of the program."""
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read().splitlines()
    with open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if not fields[1].startswith("rw") or hi - lo > max_region:
                continue
            try:
                mem.seek(lo)
                yield line, mem.read(hi - lo)
            except (OSError, ValueError, OverflowError):
                continue


WINDOW = 16                                  # the shortest piece of a token that counts as a copy
TOKEN_RUN = re.compile(rb"[A-Za-z0-9_.\-]{%d,}" % WINDOW)   # where a piece of a JWT can be


def token_copies(pid, tokens, public=(), registers=False):
    """Every copy of any WINDOW bytes of a token (at any offset) in the memory of pid, extended to the
    longest: a list of (token index, first, end, whole, maps line). A register spilled to a stack
    holds 16 to 64 bytes, a buffer half overwritten its tail: pieces as short as WINDOW count.
    Windows that also occur in a public string (the access tokens the stand-in Entra issued, whose
    JSON has the same shape and times, so that pieces of their base64 can coincide) do not. With
    registers, every thread's vector registers are searched as well (x86-64 only)."""
    public = [p.encode() for p in public]
    index = {}
    for n, tok in enumerate(tokens):
        raw = tok.encode()
        for i in range(len(raw) - WINDOW + 1):
            w = raw[i:i + WINDOW]
            if not any(w in p for p in public):
                index.setdefault(w, (n, i))
    found = []
    regions = list(memory_of(pid))
    if registers and platform.machine() == "x86_64":
        regions += vector_registers(pid)
    for line, data in regions:
        for run in TOKEN_RUN.finditer(data):
            s, e = run.span()
            at = s
            while at + WINDOW <= e:
                hit = index.get(data[at:at + WINDOW])
                if hit is None:
                    at += 1
                    continue
                n, i = hit
                raw = tokens[n].encode()
                length = WINDOW
                while at + length < e and i + length < len(raw) and data[at + length] == raw[i + length]:
                    length += 1
                found.append((n, i, i + length, i == 0 and length == len(raw), line))
                at += length
    return found


PTRACE_GETREGSET, PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_DETACH = 0x4204, 0x4206, 0x4207, 17
NT_X86_XSTATE = 0x202          # the XSAVE area: x87, SSE, AVX and AVX-512 registers
WAIT_ALL = 0x40000000          # __WALL: a traced thread that is not a child


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def vector_registers(pid):
    """Every thread's vector registers, as the XSAVE area ptrace reads: what a signal frame or any
    other register save would write to memory. Each thread is stopped only for the read."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    out = []
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        if libc.ptrace(PTRACE_SEIZE, tid, None, None) != 0:
            raise OSError(ctypes.get_errno(), f"ptrace(PTRACE_SEIZE, {tid})")
        try:
            libc.ptrace(PTRACE_INTERRUPT, tid, None, None)
            os.waitpid(tid, WAIT_ALL)
            buf = ctypes.create_string_buffer(1 << 14)
            iov = IoVec(ctypes.cast(buf, ctypes.c_void_p), len(buf))
            if libc.ptrace(PTRACE_GETREGSET, tid, NT_X86_XSTATE, ctypes.byref(iov)) == 0:
                out.append((f"registers of thread {tid}", buf.raw[:iov.len]))
        finally:
            libc.ptrace(PTRACE_DETACH, tid, None, None)
    return out


def where(line):
    """A maps line as its name ([heap], [stack], a file) or, anonymous, its address range."""
    fields = line.split(None, 5)
    if line.startswith("registers"):
        return line
    return fields[5].strip() if len(fields) == 6 else fields[0]


def describe(copies):
    return "; ".join(f"token {n} bytes {i}..{j} in {where(line)}" for n, i, j, _, line in copies[:8]) + \
        f" ({len(copies)} copies)"


class HeldRelay:
    """A TCP relay in front of the stand-in Entra that passes the daemon's bytes on at once but holds
    Entra's answers until release(): an exchange whose TLS handshake waits on the network, as on a
    slow link. seen is set once the daemon's first bytes (its ClientHello) arrived."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.seen, self.released, self.done = threading.Event(), threading.Event(), False
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while not self.done:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self.pump, args=(c,), daemon=True).start()

    def pump(self, c):
        up = socket.create_connection(("127.0.0.1", self.target_port))
        held = b""
        try:
            while not self.done:
                r, _, _ = select.select([c, up], [], [], 0.05)
                if c in r:
                    b = c.recv(65536)
                    if not b:
                        return
                    self.seen.set()
                    up.sendall(b)
                if up in r:
                    b = up.recv(65536)
                    if not b:
                        return
                    held += b
                if held and self.released.is_set():
                    c.sendall(held)
                    held = b""
        except OSError:
            return
        finally:
            c.close()
            up.close()

    def release(self):
        self.released.set()

    def close(self):
        self.done = True
        self.released.set()
        self.srv.close()


def test_no_service_account_token_left_in_memory(ctx):
    """No copy of the service-account token, whole or in part, stays anywhere in the daemon's memory
    (heap, every thread's stack, anonymous mappings) or in its threads' vector registers: every buffer
    that carried it (the file read, the form, the HTTPS request and its TLS record) is zeroed before it
    is freed, grown, or its bytes moved, and the registers its bytes went through are zeroed after use.
    Under ASan freed blocks stay in quarantine with their content, so a copy left behind is found there.

    The registers matter because whatever saves them writes them to memory: a signal frame, and lazy
    binding's resolver, which in the ASan build (then linked without -z now) wrote the last bytes
    memcpy had moved, the token's tail, onto the loop's stack at the first call of each library
    function during the first exchange. Later calls overwrote them more often than not, so a scan after
    the exchanges found them only by chance; a scan while the first exchange waits on its TLS handshake
    finds them every time. Then the request buffer holds the one whole copy it must, and a piece of
    the token anywhere is a leak. Reading the registers needs ptrace (of a child: Yama's default)."""
    if harness.VALGRIND:
        raise Skip("valgrind's own heap layout; the plain and ASan runs cover this")
    tenant = ctx.tenant("ok")
    relay = HeldRelay(ctx.fake.port)
    ctx.cleanups.append(relay.close)
    token = ctx.token()
    port = harness.free_port()
    args = ctx.daemon_args(tenant, token, port, log_level="info")
    args[args.index("--authority-host") + 1] = f"https://localhost:{relay.port}/"
    d = ctx.daemon(tenant, token=token, port=port, args=args)
    tokens = [d.token.content]
    issued = lambda: [r["access_token"] for r in ctx.fake.records(tenant) if r["access_token"]]

    first = {}
    t = threading.Thread(target=lambda: first.setdefault("r", get_token(d.port, "https://memory0.example/")))
    t.start()
    assert relay.seen.wait(10 * harness.SCALE), "the daemon never reached Entra through the relay"
    time.sleep(0.3)   # the daemon is idle, waiting for the server's handshake flight
    pending = token_copies(d.pid, tokens, issued(), registers=True)
    relay.release()
    t.join(30 * harness.SCALE)
    assert_token_ok(first["r"], resource="https://memory0.example/")
    pieces = [c for c in pending if not c[3]]
    assert not pieces, f"pieces of the service-account token while the exchange waited: {describe(pieces)}"
    assert len(pending) <= 1, f"more than the request's copy while the exchange waited: {describe(pending)}"

    for i in range(1, 3):
        res = f"https://memory{i}.example/"
        assert_token_ok(get_token(d.port, res), resource=res)
    tokens.append(d.token.rotate(newline=True))
    fp = harness.fingerprint(tokens[-1])
    wait_for(lambda: f"fp={fp}" in d.log(), 5, "the daemon to load the rotated token")
    assert_token_ok(get_token(d.port, "https://memory9.example/"), resource="https://memory9.example/")
    assert d.alive()
    left = token_copies(d.pid, tokens, issued(), registers=True)
    assert not left, f"service-account token bytes in the daemon's memory: {describe(left)}"
