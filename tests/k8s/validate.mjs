// validate.mjs - checks Kubernetes manifests against the Kubernetes API schema, offline.
//
//   node validate.mjs FILE...
//
// Every YAML document in every FILE is checked against the OpenAPI schema of its apiVersion/kind,
// as compiled into the `kubernetes-models` package (pinned in package-lock.json; Kubernetes 1.33 API).
// One line per document:  "ok FILE KIND/NAME"  or  "FAIL FILE KIND/NAME: PATH MESSAGE; ..."
// Exit status: 0 all documents valid, 1 any failure, 2 usage error. No network access.
//
// Strictness. The Kubernetes OpenAPI schema does not set additionalProperties: false, so a typo
// (`securityContex`, `restartPolcy`) would pass a plain schema check, and the API server would
// silently drop it (kubectl only warns). This validator rejects unknown fields itself: the document
// is handed to the compiled schema validator wrapped in proxies that record which keys the validator
// reads. A generated validator reads every property its schema defines (present or not), and all
// keys of a map (labels, annotations, resources), so a key of an object that it never read is not in
// the schema: an unknown field, reported as "PATH unknown field". An object of which the validator
// read nothing at all is free-form in the schema (no properties, e.g. RawExtension) and is skipped.
//
// YAML is read as YAML 1.1, as Kubernetes does (`on`/`yes` are booleans, `0644` is octal); a
// duplicate key is an error.
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

const API_VERSION = /^([a-z0-9]([a-z0-9.-]*[a-z0-9])?\/)?v[0-9]+((alpha|beta)[0-9]+)?$/;

function pointerEscape(key) {
  return key.replace(/~/g, "~0").replace(/\//g, "~1");
}

// The model class for apiVersion/kind, or an error message.
async function modelFor(apiVersion, kind) {
  if (typeof apiVersion !== "string" || typeof kind !== "string" || !apiVersion || !kind)
    return { error: "apiVersion and kind must be non-empty strings" };
  if (!API_VERSION.test(apiVersion)) return { error: `apiVersion ${JSON.stringify(apiVersion)} is malformed` };
  let mod;
  try {
    mod = await import(`kubernetes-models/${apiVersion}`);
  } catch (e) {
    if (e && (e.code === "ERR_PACKAGE_PATH_NOT_EXPORTED" || e.code === "ERR_MODULE_NOT_FOUND"))
      return { error: `apiVersion ${apiVersion} is not a built-in Kubernetes API group/version` };
    throw e;
  }
  const cls = Object.prototype.hasOwnProperty.call(mod, kind) ? mod[kind] : undefined;
  if (typeof cls !== "function" || cls.apiVersion !== apiVersion || cls.kind !== kind)
    return { error: `kind ${kind} is not known in ${apiVersion}` };
  return { cls };
}

// Wraps data in proxies recording, per plain object, the keys read. Returns the wrapped root and a
// function listing the paths of keys never read (unknown fields).
function trackReads(root) {
  const records = new Map(); // object -> { path, read: Set of keys, looked: the validator read any key }
  const proxies = new WeakMap();

  function wrap(value, path) {
    if (value === null || typeof value !== "object") return value;
    if (proxies.has(value)) return proxies.get(value);
    let proxy;
    if (Array.isArray(value)) {
      proxy = new Proxy(value, {
        get(target, key, receiver) {
          const v = Reflect.get(target, key, receiver);
          return typeof key === "string" && /^(0|[1-9][0-9]*)$/.test(key) ? wrap(v, `${path}/${key}`) : v;
        },
      });
    } else {
      const rec = { path, read: new Set(), looked: false };
      records.set(value, rec);
      const note = (key) => {
        if (typeof key !== "string") return false;
        rec.looked = true;
        if (!Object.prototype.hasOwnProperty.call(value, key)) return false;
        rec.read.add(key);
        return true;
      };
      proxy = new Proxy(value, {
        get(target, key, receiver) {
          const v = Reflect.get(target, key, receiver);
          return note(key) ? wrap(v, `${path}/${pointerEscape(key)}`) : v;
        },
        has(target, key) {
          note(key);
          return Reflect.has(target, key);
        },
      });
    }
    proxies.set(value, proxy);
    return proxy;
  }

  function unknownPaths() {
    const out = [];
    for (const [obj, rec] of records) {
      if (!rec.looked) continue; // free-form object: the schema says nothing about its keys
      for (const key of Object.keys(obj)) if (!rec.read.has(key)) out.push(`${rec.path}/${pointerEscape(key)}`);
    }
    return out;
  }

  return { proxy: wrap(root, ""), unknownPaths };
}

function describe(err) {
  let msg = err.message || err.keyword;
  if (err.keyword === "enum" && err.params && err.params.allowedValues)
    msg += ` (${err.params.allowedValues.map((v) => JSON.stringify(v)).join(", ")})`;
  return `${err.instancePath || "/"} ${msg}`;
}

async function validateDocument(obj) {
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) return ["/ must be an object"];
  const { cls, error } = await modelFor(obj.apiVersion, obj.kind);
  if (error) return [`/ ${error}`];
  const { proxy, unknownPaths } = trackReads(obj);
  const problems = [];
  try {
    cls.prototype.validate.call(proxy); // throws a ValidationError listing every schema violation
  } catch (e) {
    if (!e || !Array.isArray(e.errors)) throw e;
    for (const err of e.errors) problems.push(describe(err));
  }
  for (const path of unknownPaths()) problems.push(`${path} unknown field`);
  return [...new Set(problems)];
}

function label(obj, index) {
  const kind = obj && typeof obj === "object" && typeof obj.kind === "string" ? obj.kind : "?";
  const meta = obj && typeof obj === "object" && obj.metadata && typeof obj.metadata === "object" ? obj.metadata : {};
  const name = typeof meta.name === "string" ? meta.name : `(document ${index + 1})`;
  return `${kind}/${name}`;
}

async function validateFile(file) {
  let text;
  try {
    text = readFileSync(file, "utf8");
  } catch (e) {
    console.log(`FAIL ${file} -: cannot read: ${e.message}`);
    return false;
  }
  let ok = true;
  const docs = parseAllDocuments(text, { version: "1.1", uniqueKeys: true, prettyErrors: true });
  const list = Array.isArray(docs) ? docs : [docs]; // an empty stream gives an EmptyStream, not an array
  let seen = 0;
  for (const [index, doc] of list.entries()) {
    if (doc.errors && doc.errors.length) {
      console.log(`FAIL ${file} (document ${index + 1}): yaml: ${doc.errors[0].message.split("\n")[0].replace(/:\s*$/, "")}`);
      ok = false;
      continue;
    }
    const obj = doc.toJS({ maxAliasCount: 100 });
    if (obj === null || obj === undefined) continue; // an empty document (comments only)
    seen++;
    const problems = await validateDocument(obj);
    if (problems.length) {
      console.log(`FAIL ${file} ${label(obj, index)}: ${problems.join("; ")}`);
      ok = false;
    } else {
      console.log(`ok ${file} ${label(obj, index)}`);
    }
  }
  if (seen === 0 && ok) {
    console.log(`FAIL ${file} -: no Kubernetes object in the file`);
    ok = false;
  }
  return ok;
}

const files = process.argv.slice(2);
if (files.length === 0 || files.some((f) => f === "-h" || f === "--help")) {
  console.error("usage: node validate.mjs FILE.yaml...");
  process.exit(2);
}
let allOk = true;
for (const file of files) if (!(await validateFile(file))) allOk = false;
process.exit(allOk ? 0 : 1);
