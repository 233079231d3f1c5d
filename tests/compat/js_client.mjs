// js_client.mjs - runs the real @azure/identity (pinned in package.json / package-lock.json) the way an
// unmodified application does, and reports what it got. Used by tests/integration/test_sdk_js.py.
//
//   node js_client.mjs '<instructions JSON>'      (or the JSON on stdin when there is no argument)
//
// Instructions: {"credential": "ManagedIdentityCredential" | "DefaultAzureCredential",
//                "options": {...},        passed verbatim to the credential's constructor
//                                         (MIC: clientId | objectId | resourceId;
//                                          DAC: managedIdentityClientId | managedIdentityResourceId)
//                "scopes": ["https://vault.azure.net/.default", ...],  one getToken([scope]) each, in order,
//                                         on ONE credential (a repeated scope shows the SDK's own cache)
//                "log": true}             SDK verbose log to stderr
// Output: one JSON line per scope on stdout:
//   {"scope", "ok", "token", "expiresOnTimestamp", "refreshAfterTimestamp", "tokenType",
//    "error": {"name", "message"} | null, "elapsedMs"}
// The environment is whatever the caller gives the process: that is the point of the test.
import { readFileSync } from "node:fs";
import { setLogLevel } from "@azure/logger";
import { DefaultAzureCredential, ManagedIdentityCredential } from "@azure/identity";

const spec = JSON.parse(process.argv[2] ?? readFileSync(0, "utf8"));
if (spec.log) {
  setLogLevel("verbose");
}

function errorOf(e) {
  return { name: e?.name ?? typeof e, message: String(e?.message ?? e) };
}

let credential = null;
let constructError = null;
try {
  const options = spec.options ?? {};
  if (spec.credential === "ManagedIdentityCredential") {
    credential = new ManagedIdentityCredential(options);
  } else if (spec.credential === "DefaultAzureCredential") {
    credential = new DefaultAzureCredential(options);
  } else {
    throw new Error(`unknown credential ${spec.credential}`);
  }
} catch (e) {
  constructError = errorOf(e);
}

for (const scope of spec.scopes ?? []) {
  const t0 = performance.now();
  const out = { scope, ok: false, token: null, expiresOnTimestamp: null, refreshAfterTimestamp: null,
                tokenType: null, error: constructError, elapsedMs: 0 };
  if (credential) {
    try {
      const t = await credential.getToken([scope]);
      if (t) {
        Object.assign(out, { ok: true, token: t.token, expiresOnTimestamp: t.expiresOnTimestamp,
                             refreshAfterTimestamp: t.refreshAfterTimestamp ?? null,
                             tokenType: t.tokenType ?? null, error: null });
      } else {
        out.error = { name: "null", message: "getToken returned null" };
      }
    } catch (e) {
      out.error = errorOf(e);
    }
  }
  out.elapsedMs = Math.round(performance.now() - t0);
  process.stdout.write(JSON.stringify(out) + "\n");
}
// Do not wait for keep-alive sockets or timers of the SDK.
process.exit(0);
