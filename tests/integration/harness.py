"""harness.py - helpers for the imdsd integration tests (stdlib only): one import for all of them.

The helpers live in modules by subject; this facade re-exports their public names, so that
`import harness` and `from harness import X` work in the tests, the SDK compat clients, the bench and
tests/check_systemd.py:
  harness_base    the build variant under test (BINARY, LABEL, VALGRIND, SCALE), shared constants,
                  ports, wait_for(), concurrently(), Skip
  harness_http    HTTP client helpers and the IMDS response checks
  harness_tokens  projected service-account tokens: JWTs, the kubelet's volume layout and rotation
  harness_daemon  imdsd (Daemon, run_once) and the stand-in Entra (Fake); the daemon's log lines
  harness_netns   network namespaces and the setpriv privilege prefixes
  harness_ctx     Ctx, the per-test context conftest.py hands to each test

Configured per test by conftest.py for the build variant (BINARY, LABEL, VALGRIND, SCALE); tests
receive a Ctx. Those four are not copies here: reading or assigning harness.BINARY reads or assigns
harness_base.BINARY, the one value every module reads at call time. Assigning any other re-exported
name is refused (the modules that use it would not see the change). `from harness import SCALE`
copies the value of the moment: read harness.SCALE where it must follow the variant.
"""
import sys
import types

import harness_base
from harness_base import (CLIENT_ID, HERE, JSON_CT, LIVE, PORT_BASE, PORT_SPAN, RESOURCE, TOKEN_PATH, Skip,
                          concurrently, cpu_seconds, free_port, reachable_by_all, thread_nices, unique,
                          wait_for)
from harness_ctx import Ctx
from harness_daemon import Daemon, Fake, base_env, check_tool_output, command, log_events, log_ts, run_once
from harness_http import (IMDS_FIELDS, Resp, assert_json_error, assert_token_ok, complete_response, get_token,
                          parse_raw, raw_exchange, raw_get, read_responses, request, split_responses, token_url)
from harness_netns import (IP, LIVE_NETNS, NETNS_PREFIX, NOBODY, SETPRIV, NetNS, in_netns, only_cap_prefix,
                           unprivileged_prefix)
from harness_tokens import KubeletToken, ProjectedToken, b64url, fingerprint, make_jwt, make_jwt_with

VARIANT_STATE = ("BINARY", "LABEL", "VALGRIND", "SCALE")   # live in harness_base, forwarded
REEXPORTED = frozenset(n for n, v in globals().items()
                       if not n.startswith("_") and not isinstance(v, types.ModuleType)
                       and n not in ("VARIANT_STATE", "REEXPORTED"))
__all__ = sorted(REEXPORTED | set(VARIANT_STATE))


def _forward(name):
    return property(lambda self: getattr(harness_base, name),
                    lambda self, value: setattr(harness_base, name, value),
                    doc=f"harness_base.{name}")


class _Facade(types.ModuleType):
    """The class of this module: forwards the variant state, refuses to shadow a re-exported name."""

    def __setattr__(self, name, value):
        if name in REEXPORTED:
            raise AttributeError(f"harness.{name} is re-exported from another module: assigning it here "
                                 "would change nothing the helpers use; assign it in that module")
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(VARIANT_STATE))


for _name in VARIANT_STATE:
    setattr(_Facade, _name, _forward(_name))
del _name

sys.modules[__name__].__class__ = _Facade
