// Validates Gateway API and Istio objects against their CRD schemas, offline, for
// tests/tests/chart.rs.
//
// usage: node validate_crds.mjs <tools node dir> <object.json>...
//
// Two checks per object, both from the npm packages @kubernetes-models/gateway-api and
// @kubernetes-models/istio (models generated from the upstream CRDs):
//   1. the package's validate(): types, required fields, enums, patterns, limits;
//   2. unknown fields: validate() lets them through (the generated schemas allow additional
//      properties), so the object is also type-checked by TypeScript as an object literal of
//      the model's interface, where a property the CRD does not define is an error.
// Prints `ok <file> <kind>/<name>` or `error <file> <kind>/<name>: <what>` per object; exits 1
// if any object failed, 2 on a usage or setup error.

import { readFileSync, writeFileSync, mkdtempSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [nodeDir, ...files] = process.argv.slice(2);
if (!nodeDir || files.length === 0) {
  console.error("usage: node validate_crds.mjs <tools node dir> <object.json>...");
  process.exit(2);
}
const modelsDir = join(nodeDir, "node_modules", "@kubernetes-models");

// Which package holds the models of an API group.
const PACKAGES = {
  "gateway.networking.k8s.io": "gateway-api",
  "gateway.networking.x-k8s.io": "gateway-api",
  "networking.istio.io": "istio",
  "security.istio.io": "istio",
  "telemetry.istio.io": "istio",
  "extensions.istio.io": "istio",
};

function modelPath(obj) {
  const [group, version] = String(obj.apiVersion ?? "").split("/");
  const pkg = PACKAGES[group];
  if (!pkg || !version || typeof obj.kind !== "string") {
    return null;
  }
  return `${pkg}/${group}/${version}/${obj.kind}`;
}

const objects = files.map((file) => {
  const obj = JSON.parse(readFileSync(file, "utf8"));
  const name = `${obj.kind}/${obj.metadata?.name ?? "?"}`;
  return { file, obj, name, model: modelPath(obj), errors: [] };
});

// 1. The models' own validation.
for (const o of objects) {
  if (!o.model) {
    o.errors.push(`no model for apiVersion ${o.obj.apiVersion} kind ${o.obj.kind}`);
    continue;
  }
  let Model;
  try {
    const module = await import(pathToFileURL(join(modelsDir, `${o.model}.js`)).href);
    Model = module[o.obj.kind];
  } catch (err) {
    o.errors.push(`no model ${o.model} (${err.message})`);
    continue;
  }
  try {
    new Model(o.obj).validate();
  } catch (err) {
    o.errors.push(err.message);
  }
}

// 2. Unknown fields, through TypeScript's excess-property check on object literals.
const checked = objects.filter((o) => o.model && o.errors.length === 0);
if (checked.length > 0) {
  const require = createRequire(join(nodeDir, "package.json"));
  const ts = require("typescript");
  const dir = mkdtempSync(join(tmpdir(), "validate-crds-"));
  try {
    const lines = [];
    checked.forEach((o, i) => {
      lines.push(`import type { I${o.obj.kind} as T${i} } from "@kubernetes-models/${o.model}";`);
    });
    const starts = [];
    checked.forEach((o, i) => {
      starts.push(lines.length);
      lines.push(`export const o${i}: T${i} = ${JSON.stringify(o.obj)};`);
    });
    const source = join(dir, "objects.ts");
    writeFileSync(source, lines.join("\n") + "\n");
    const program = ts.createProgram([source], {
      noEmit: true,
      strict: true,
      target: ts.ScriptTarget.ES2022,
      module: ts.ModuleKind.ESNext,
      moduleResolution: ts.ModuleResolutionKind.Bundler,
      baseUrl: dir,
      paths: { "@kubernetes-models/*": [join(modelsDir, "*")] },
      types: [],
      skipLibCheck: true,
    });
    for (const d of ts.getPreEmitDiagnostics(program)) {
      const text = ts.flattenDiagnosticMessageText(d.messageText, "\n");
      if (!d.file || d.file.fileName !== source.replaceAll("\\", "/")) {
        // A problem outside the objects (a model that does not load) fails every object.
        checked.forEach((o) => o.errors.push(`TypeScript: ${text}`));
        continue;
      }
      const { line } = d.file.getLineAndCharacterOfPosition(d.start ?? 0);
      const index = starts.findLastIndex((start) => start <= line);
      const target = index >= 0 ? checked[index] : null;
      if (target) {
        target.errors.push(text);
      } else {
        checked.forEach((o) => o.errors.push(`TypeScript: ${text}`));
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

let failed = 0;
for (const o of objects) {
  if (o.errors.length === 0) {
    console.log(`ok ${o.file} ${o.name}`);
  } else {
    failed += 1;
    console.log(`error ${o.file} ${o.name}: ${o.errors.join("; ")}`);
  }
}
process.exit(failed > 0 ? 1 : 0);
