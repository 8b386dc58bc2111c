// Validates every KEDA ScaledObject of a rendered manifest file against KEDA's CRD schema (the compiled
// validators of npm's @kubernetes-models/keda). Usage: node check-keda.mjs FILE; exits non-zero naming the
// field at fault, or when the file has no ScaledObject. Run by deploy/check-deploy.sh.
import { readFileSync } from "node:fs";
import yaml from "js-yaml";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";

let checked = 0;
for (const doc of yaml.loadAll(readFileSync(process.argv[2], "utf8"))) {
  if (doc?.kind !== "ScaledObject") continue;
  try {
    new ScaledObject(doc).validate();
  } catch (e) {
    console.error(`ScaledObject/${doc.metadata?.name}: ${e.message}`);
    process.exit(1);
  }
  checked++;
  console.log(`ok: ScaledObject/${doc.metadata.name} against KEDA's schema`);
}
if (checked === 0) {
  console.error(`${process.argv[2]}: no ScaledObject`);
  process.exit(1);
}
