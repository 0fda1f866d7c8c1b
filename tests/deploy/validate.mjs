// Validates Kubernetes objects offline against the JSON schemas that the npm package
// kubernetes-models (version pinned in package-lock.json) generates from the Kubernetes
// OpenAPI specification. Input: a JSON array of objects (file argument or stdin).
// Strict mode, like kubeconform -strict: the generated schemas let unknown fields through,
// so every field name is also checked against the interfaces in the package's type
// declarations (*.d.ts, generated from the same specification), recursively; a misspelt
// or misplaced field (say `livenesProbe`, or `grpc` outside a probe) is an error.
// Output: one line per object, "ok KIND/NAME" or "invalid KIND/NAME: errors"; exit 1 if
// any object is invalid or of a kind this script does not know.
import { readFileSync, existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const NODE_MODULES = join(dirname(fileURLToPath(import.meta.url)), "node_modules");
const interfaces = new Map(); // .d.ts path -> {props: Map(name -> type text), imports}

function loadInterface(file) {
  if (interfaces.has(file)) return interfaces.get(file);
  let info = null;
  if (existsSync(file)) {
    const text = readFileSync(file, "utf8").replace(/\/\*[\s\S]*?\*\//g, "");
    const imports = new Map();
    for (const m of text.matchAll(/import \{ (\w+) \} from "([^"]+)";/g)) {
      const spec = m[2].replace(/\.js$/, "");
      imports.set(m[1], spec.startsWith(".") ? join(dirname(file), spec + ".d.ts")
                                             : join(NODE_MODULES, spec + ".d.ts"));
    }
    const body = text.match(/export interface \w+(?: extends [\w, ]+)? \{([\s\S]*?)\n\}/);
    if (body) {
      const props = new Map();
      for (const m of body[1].matchAll(/^\s*"([^"]+)"\??: (\{[^}]*\}|.*);$/gm)) props.set(m[1], m[2]);
      info = { props, imports };
    }
  }
  interfaces.set(file, info);
  return info;
}

// Fails every field of value that the interface in file does not declare, recursively.
function strictCheck(value, file, path, errors) {
  const info = loadInterface(file);
  if (!info || value === null || typeof value !== "object" || Array.isArray(value)) return;
  for (const [key, child] of Object.entries(value)) {
    const type = info.props.get(key);
    if (type === undefined) {
      errors.push(`${path}/${key}: unknown field`);
      continue;
    }
    checkTyped(child, type.trim(), info, `${path}/${key}`, errors);
  }
}

function checkTyped(value, type, info, path, errors) {
  let m;
  if ((m = type.match(/^Array<(.*)>$/))) {
    if (Array.isArray(value)) value.forEach((v, i) => checkTyped(v, m[1], info, `${path}/${i}`, errors));
  } else if ((m = type.match(/^\{\s*\[key: string\]: (.*?);?\s*\}$/))) {
    if (value && typeof value === "object")
      for (const [k, v] of Object.entries(value)) checkTyped(v, m[1], info, `${path}/${k}`, errors);
  } else if (info.imports.has(type)) {
    strictCheck(value, info.imports.get(type), path, errors);
  }
}

const models = {
  "v1/Namespace": ["kubernetes-models/v1/Namespace", "Namespace"],
  "v1/Service": ["kubernetes-models/v1/Service", "Service"],
  "v1/Secret": ["kubernetes-models/v1/Secret", "Secret"],
  "v1/ConfigMap": ["kubernetes-models/v1/ConfigMap", "ConfigMap"],
  "v1/PersistentVolumeClaim": ["kubernetes-models/v1/PersistentVolumeClaim", "PersistentVolumeClaim"],
  "apps/v1/Deployment": ["kubernetes-models/apps/v1/Deployment", "Deployment"],
  "apps/v1/StatefulSet": ["kubernetes-models/apps/v1/StatefulSet", "StatefulSet"],
  "networking.k8s.io/v1/NetworkPolicy": ["kubernetes-models/networking.k8s.io/v1/NetworkPolicy", "NetworkPolicy"],
};

const text = readFileSync(process.argv[2] || 0, "utf8");
const objects = JSON.parse(text);
let bad = 0;
for (const obj of objects) {
  const key = `${obj.apiVersion}/${obj.kind}`;
  const name = `${obj.kind}/${obj.metadata && obj.metadata.name}`;
  const entry = models[key];
  if (!entry) {
    console.log(`invalid ${name}: no schema for ${key} in validate.mjs`);
    bad++;
    continue;
  }
  const mod = await import(entry[0]);
  const errors = [];
  try {
    new mod[entry[1]](obj).validate();
  } catch (e) {
    errors.push(e.message.replace(/\n/g, "; "));
  }
  strictCheck(obj, join(NODE_MODULES, entry[0] + ".d.ts"), "", errors);
  if (errors.length) {
    console.log(`invalid ${name}: ${errors.join("; ")}`);
    bad++;
  } else {
    console.log(`ok ${name}`);
  }
}
process.exit(bad ? 1 : 0);
