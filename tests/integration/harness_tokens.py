"""harness_tokens.py - projected service-account tokens: JWT-shaped contents and the kubelet's layout.

make_jwt()/make_jwt_with() build projected-token-shaped JWS strings; ProjectedToken and KubeletToken
write a projected volume (..<timestamp> directory, ..data symlink) and rotate it atomically, as the
kubelet does; fingerprint() is the daemon's short hash of a token.
"""
import base64, hashlib, json, os, shutil, tempfile, time, uuid


# ---- projected service-account token ------------------------------------------------------------

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(lifetime=3600, sub="system:serviceaccount:default:workload"):
    now = int(time.time())
    head = {"alg": "RS256", "kid": b64url(os.urandom(12))}
    claims = {"aud": ["api://AzureADTokenExchange"], "exp": now + lifetime, "iat": now, "nbf": now,
              "iss": "https://oidc.prod-aks.azure.com/00000000-1111-2222-3333-444444444444/", "sub": sub,
              "jti": str(uuid.uuid4()),
              "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "workload", "uid": str(uuid.uuid4())},
                                "pod": {"name": "workload-7d9c", "uid": str(uuid.uuid4())}}}
    enc = lambda o: b64url(json.dumps(o, separators=(",", ":")).encode())
    return f"{enc(head)}.{enc(claims)}.{b64url(os.urandom(256))}"


class ProjectedToken:
    """A kubelet-style projected volume: DIR/..<ts>/NAME, DIR/..data -> ..<ts>, DIR/NAME -> ..data/NAME."""
    NAME = "azure-identity-token"

    def __init__(self, root, content=None, newline=False):
        self.root, self.gen = root, 0
        os.makedirs(root, exist_ok=True)
        self.path = os.path.join(root, self.NAME)
        self.content = None
        self.rotate(content, newline=newline)
        os.symlink(os.path.join("..data", self.NAME), self.path)

    def rotate(self, content=None, newline=False):
        """Atomic writer: new timestamped dir, ..data_tmp symlink renamed over ..data, old dir removed."""
        self.gen += 1
        content = content if content is not None else make_jwt()
        ts = time.strftime("..%Y_%m_%d_%H_%M_%S", time.gmtime()) + f".{self.gen}{os.getpid() % 1000:03d}"
        d = os.path.join(self.root, ts)
        os.mkdir(d)
        with open(os.path.join(d, self.NAME), "w") as f:
            f.write(content + ("\n" if newline else ""))
        old = os.readlink(os.path.join(self.root, "..data")) if os.path.islink(os.path.join(self.root, "..data")) else None
        tmp = os.path.join(self.root, "..data_tmp")
        os.symlink(ts, tmp)
        os.rename(tmp, os.path.join(self.root, "..data"))
        if old:
            for f in os.listdir(os.path.join(self.root, old)):
                os.unlink(os.path.join(self.root, old, f))
            os.rmdir(os.path.join(self.root, old))
        self.content = content
        return content

    @property
    def sha256(self):
        return hashlib.sha256(self.content.encode()).hexdigest()


# ---- token-file life cycle: the kubelet's atomic writer, JWT variants -----------------------------

def make_jwt_with(lifetime=3600, drop=(), payload=None, **claims):
    """A projected-token-shaped JWS with claims overridden (claims=...), removed (drop=...), or with
    payload (bytes) as the raw decoded payload segment. Returns (jwt, claims dict or None)."""
    now = int(time.time())
    c = {"aud": ["api://AzureADTokenExchange"], "exp": now + lifetime, "iat": now, "nbf": now,
         "iss": "https://oidc.prod-aks.azure.com/00000000-1111-2222-3333-444444444444/",
         "sub": "system:serviceaccount:default:workload", "jti": str(uuid.uuid4()),
         "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "workload", "uid": str(uuid.uuid4())},
                           "pod": {"name": "workload-7d9c", "uid": str(uuid.uuid4())}}}
    c.update(claims)
    for k in drop:
        c.pop(k, None)
    head = b64url(json.dumps({"alg": "RS256", "kid": b64url(os.urandom(12))}, separators=(",", ":")).encode())
    body = payload if payload is not None else json.dumps(c, separators=(",", ":")).encode()
    return f"{head}.{b64url(body)}.{b64url(os.urandom(256))}", (None if payload is not None else c)


def fingerprint(content):
    """The daemon's 12-hex fingerprint of a (whitespace-trimmed) token: the first 6 bytes of SHA-256."""
    if isinstance(content, str):
        content = content.encode()
    return hashlib.sha256(content.strip(b" \t\r\n")).hexdigest()[:12]


class KubeletToken:
    """A projected service-account token volume written exactly as the kubelet's AtomicWriter.Write
    (kubernetes pkg/volume/util/atomic_writer.go) does it, so inotify sees the real event sequence:
      ROOT/..2026_11_28_12_00_00.<rand>/   MkdirTemp, then chmod 0755, then the payload inside
      ROOT/..data_tmp -> ..2026_...<rand>  symlink, then rename("..data_tmp", "..data")
      user-visible symlinks (created once, never changed), then RemoveAll of the old timestamped dir.
    Layouts (imds-protocol.md section 4):
      nested=False (AZWI <= v1.5): ROOT/azure-identity-token -> ..data/azure-identity-token
      nested=True  (AZWI v1.6):    ROOT/token -> ..data/token; the file is ROOT/token/azure-identity-token
    .path is what AZURE_FEDERATED_TOKEN_FILE names. With create=False nothing (not even ROOT) exists
    until the first rotate(). rotate() accepts the same arguments as ProjectedToken.rotate, bytes, or
    KubeletToken.DIRECTORY (the payload path becomes a directory). Every rotation is recorded in
    .rotations as dict(gen, sha256, fp, t_before, t_renamed, t_done): time.time() stamps just before
    and just after the rename (comparable with fake_entra's "time") and after the old dir is gone."""
    NAME = "azure-identity-token"
    DIRECTORY = object()

    def __init__(self, root, content=None, newline=False, nested=False, create=True, mode=0o644):
        self.root, self.nested, self.mode = root, nested, mode
        self.rel = os.path.join("token", self.NAME) if nested else self.NAME
        self.path = os.path.join(root, self.rel)
        self.content, self.gen, self.rotations = None, 0, []
        if create:
            self.rotate(content, newline=newline)

    def rotate(self, content=None, newline=False):
        content = make_jwt() if content is None else content
        os.makedirs(self.root, exist_ok=True)   # the volume's mount point
        data = os.path.join(self.root, "..data")
        old = os.readlink(data) if os.path.islink(data) else None
        ts_dir = tempfile.mkdtemp(prefix=time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()), dir=self.root)
        os.chmod(ts_dir, 0o755)
        target = os.path.join(ts_dir, self.rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if content is self.DIRECTORY:
            os.mkdir(target)
            raw = None
        else:
            raw = content.encode() if isinstance(content, str) else bytes(content)
            raw += b"\n" if newline else b""
            with open(target, "wb") as f:
                f.write(raw)
            os.chmod(target, self.mode)
        tmp = os.path.join(self.root, "..data_tmp")
        os.symlink(os.path.basename(ts_dir), tmp)
        t_before = time.time()
        os.rename(tmp, data)
        t_renamed = time.time()
        top = self.rel.split(os.sep)[0]
        if not os.path.islink(os.path.join(self.root, top)):
            os.symlink(os.path.join("..data", top), os.path.join(self.root, top))
        if old:
            shutil.rmtree(os.path.join(self.root, old))
        self.gen += 1
        self.content = None if raw is None else raw.decode(errors="replace")
        rec = {"gen": self.gen, "sha256": None if raw is None else hashlib.sha256(raw.strip(b" \t\r\n")).hexdigest(),
               "fp": None if raw is None else fingerprint(raw), "t_before": t_before, "t_renamed": t_renamed,
               "t_done": time.time()}
        self.rotations.append(rec)
        return content

    def remove_data(self):
        """Takes ..data away (the visible symlink then dangles): the token file is missing."""
        data = os.path.join(self.root, "..data")
        old = os.readlink(data)
        os.unlink(data)
        shutil.rmtree(os.path.join(self.root, old))

    @property
    def sha256(self):
        return hashlib.sha256(self.content.strip().encode()).hexdigest()
