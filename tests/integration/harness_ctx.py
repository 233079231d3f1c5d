"""harness_ctx.py - Ctx, the per-test context that conftest.py's ctx fixture hands to every test.

A Ctx owns a temp dir, makes tenants unique to its test at the shared stand-in Entra, starts daemons
(optionally inside a fresh network namespace with its own stand-in Entra) and, in finish(), stops
them, checks their sanitizer/valgrind output and runs the cleanups.
"""
import os, subprocess

import harness_base as base
from harness_base import CLIENT_ID, free_port
from harness_daemon import Daemon, Fake, run_once
from harness_netns import NetNS, only_cap_prefix
from harness_tokens import ProjectedToken


class Ctx:
    """Fresh state for one test: a temp dir, unique tenants, daemons that are stopped and checked."""

    def __init__(self, name, tmp, certs, fakes):
        self.name, self.tmp, self.certs = name, tmp, certs
        self.fake, self.fake_wronghost, self.fake_rogue = fakes["good"], fakes["wronghost"], fakes["rogue"]
        self.daemons, self.n = [], 0
        self.scale = base.SCALE
        self.cleanups = []   # callables run by finish() after the daemons stopped, last added first

    def tenant(self, behaviour="ok"):
        """A tenant unique to this test whose default behaviour at the fake is behaviour."""
        self.n += 1
        return f"{behaviour}.{self.name.replace('_', '-')}-{self.n}"

    def token(self, content=None, newline=False):
        self.n += 1
        return ProjectedToken(os.path.join(self.tmp, f"sa-token-{self.n}"), content, newline)

    def daemon_args(self, tenant=None, token=None, port=None, fake=None, client_id=CLIENT_ID,
                    extra=(), log_level="debug"):
        fake = fake or self.fake
        args = ["--listen", f"127.0.0.1:{port}", "--authority-host", f"https://localhost:{fake.port}/",
                "--ca-file", self.certs["ca.pem"]]
        if client_id is not None:
            args += ["--client-id", client_id]
        if tenant is not None:
            args += ["--tenant-id", tenant]
        if token is not None:
            args += ["--token-file", token.path]
        if log_level:
            args += ["--log-level", log_level]
        return args + list(extra)

    def daemon(self, tenant=None, token=None, extra=(), env=None, fake=None, client_id=CLIENT_ID,
               args=None, start=True, port=None, log_level="debug", wait=True, netns=None, host="127.0.0.1",
               unprivileged=False, prefix=(), binary=None):
        """Starts imdsd against the fake; returns the Daemon (d.port, d.tenant, d.token).
        netns/host: run it inside that network namespace and poll /healthz there on host:port;
        prefix, binary: see Daemon (qemu-aarch64-static and the arm64 build, say)."""
        tenant = tenant or self.tenant("ok")
        token = token or self.token()
        port = port or free_port()
        if args is None:
            args = self.daemon_args(tenant, token, port, fake, client_id, extra, log_level)
        self.n += 1
        d = Daemon(args, env, self.tmp, f"imdsd-{self.n}", port, netns=netns, host=host, unprivileged=unprivileged,
                   prefix=prefix, binary=binary)
        d.tenant, d.token = tenant, token
        (fake or self.fake).control(tenant, token_file=token.path)
        self.daemons.append(d)
        if start:
            d.start(wait=wait)
        return d

    def run(self, args, env=None, timeout=10):
        return run_once(args, env, timeout, self.tmp)

    def netns(self):
        """A fresh network namespace (lo up) for this test, deleted by finish()."""
        ns = NetNS.create()
        self.cleanups.append(ns.delete)
        return ns

    def netns_daemon(self, host, port, addresses=(), extra=(), imds_address=False):
        """A network namespace standing for a pod or a VM: the addresses (CIDR) on its lo, a stand-in
        Entra on its localhost, and imdsd inside serving tokens on host:port (extra: more flags).
        imds_address: the pod's IMDS-address option with its privileges: 169.254.169.254 added by
        `imdsd --add-loopback-address` holding CAP_NET_ADMIN alone (the init container), the pod
        sysctl net.ipv4.ip_unprivileged_port_start=80, and imdsd as NOBODY with no capability.
        Returns (ns, daemon, fake)."""
        ns = self.netns()
        for a in addresses:
            ns.ip("addr", "add", a, "dev", "lo")
        if imds_address:
            rc, out, err = run_once(["--add-loopback-address", "169.254.169.254"],
                                    prefix=ns.prefix() + only_cap_prefix("net_admin"), vgdir=self.tmp)
            assert rc == 0 and "result=added" in err, f"init mode: status {rc}: {err.strip()}"
            p = subprocess.run(ns.prefix() + ["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=80"],
                               capture_output=True, text=True)
            assert p.returncode == 0, f"sysctl in {ns}: {p.stderr.strip()}"
        tok = self.token()
        tenant = self.tenant("ok")
        fake = Fake(self.tmp, f"netns-{self.n}", self.certs["leaf.pem"], self.certs["leaf.key"], netns=ns,
                    token_file=tok.path)
        self.cleanups.append(fake.stop)
        args = self.daemon_args(tenant, tok, port, fake, extra=extra)
        args[args.index("--listen") + 1] = f"{host}:{port}"
        d = self.daemon(tenant, tok, args=args, fake=fake, port=port, netns=ns, host=host,
                        unprivileged=imds_address)
        return ns, d, fake

    def finish(self):
        """Stops every daemon this test started, then runs the cleanups; returns the reasons any daemon
        did not stop cleanly (or a cleanup failed)."""
        errors = []
        for d in self.daemons:
            try:
                d.stop()
            except AssertionError as e:
                errors.append(str(e))
            finally:
                d.kill()
        while self.cleanups:
            fn = self.cleanups.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - reported like a daemon that did not stop
                errors.append(f"cleanup {getattr(fn, '__qualname__', fn)} failed: {e}")
        return errors

    def log_tail(self, n=15):
        out = []
        for d in self.daemons:
            lines = d.log().splitlines()[-n:]
            if lines:
                out.append(f"  --- {d.name} stderr (last {len(lines)} lines) ---")
                out += ["  " + l for l in lines]
            vg = d.vg_log()
            if vg and "ERROR SUMMARY: 0 errors" not in vg:
                out.append(f"  --- {d.name} valgrind ---")
                out += ["  " + l for l in vg.splitlines()[-40:]]
        return "\n".join(out)
