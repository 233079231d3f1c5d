#!/usr/bin/python3
"""py_client.py - runs the real azure-identity (Debian's python3-azure) the way an unmodified
application does, and reports what it got. Used by tests/integration/test_sdk_python.py.

  /usr/bin/python3 py_client.py '<instructions JSON>'     (or the JSON on stdin without an argument)

Instructions: {"credential": "ManagedIdentityCredential" | "DefaultAzureCredential",
               "options": {...},     keyword arguments passed verbatim to the constructor
                                     (MIC: client_id=..., identity_config={"object_id": ...} or
                                      {"mi_res_id": ...}; DAC: managed_identity_client_id=...)
               "scopes": [...],      one get_token(scope) each, in order, on ONE credential
                                     (a repeated scope shows the SDK's own cache)
               "log": true}          SDK debug log (azure.*, msal) to stderr
Output: one JSON line per scope on stdout:
  {"scope", "ok", "token", "expires_on", "error": {"name", "message", "cause"} | null, "elapsed_ms"}
The environment is whatever the caller gives the process: that is the point of the test.
"""
import json
import logging
import sys
import time


def error_of(e):
    cause = e.__cause__ or e.__context__
    return {"name": type(e).__name__, "message": str(e),
            "cause": f"{type(cause).__name__}: {cause}" if cause is not None else None}


def main():
    spec = json.loads(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())
    if spec.get("log"):
        logging.basicConfig(stream=sys.stderr, level=logging.DEBUG,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    cred, construct_error = None, None
    try:
        kind = {"ManagedIdentityCredential": ManagedIdentityCredential,
                "DefaultAzureCredential": DefaultAzureCredential}[spec["credential"]]
        cred = kind(**spec.get("options", {}))
    except Exception as e:  # noqa: BLE001 - reported, like every get_token failure
        construct_error = error_of(e)

    for scope in spec.get("scopes", []):
        t0 = time.monotonic()
        out = {"scope": scope, "ok": False, "token": None, "expires_on": None, "error": construct_error}
        if cred is not None:
            try:
                t = cred.get_token(scope)
                out.update(ok=True, token=t.token, expires_on=t.expires_on, error=None)
            except Exception as e:  # noqa: BLE001
                out["error"] = error_of(e)
        out["elapsed_ms"] = round((time.monotonic() - t0) * 1000)
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
