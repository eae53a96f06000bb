// Validate .glb/.gltf files with the Khronos glTF validator (npm package `gltf-validator`).
// usage: node scripts/gltf_validate.mjs FILE...   (NODE_PATH must reach gltf-validator)
// Prints one JSON line per file: {"file", "errors", "warnings", "infos", "messages": [first errors]}.
import { createRequire } from "module";
import { readFileSync } from "fs";
const require = createRequire(import.meta.url);
const validator = require("gltf-validator");

let failed = 0;
for (const file of process.argv.slice(2)) {
  const report = await validator.validateBytes(new Uint8Array(readFileSync(file)), {
    externalResourceFunction: (uri) => Promise.reject(new Error(`external resource ${uri}`)),
  });
  const issues = report.issues;
  const messages = issues.messages.filter((m) => m.severity === 0).slice(0, 5).map((m) => `${m.code}: ${m.message}`);
  console.log(JSON.stringify({ file, errors: issues.numErrors, warnings: issues.numWarnings,
                               infos: issues.numInfos, messages }));
  if (issues.numErrors > 0) failed += 1;
}
process.exit(failed ? 1 : 0);
