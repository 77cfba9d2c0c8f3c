// The console's event-type pattern rule (`selects` in catalogue.js) against
// the table core::matching is tested with (crates/core/tests/type_patterns.json),
// so the console shows the types a webhook really gets. Run by
// tests/tests/type_patterns.rs; needs node only, no packages.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { selects } from '../../crates/admin/console/catalogue.js';

const table = JSON.parse(
  readFileSync(new URL('../../crates/core/tests/type_patterns.json', import.meta.url), 'utf8'),
);
let failed = 0;
for (const [pattern, type, expected] of table.cases) {
  try {
    assert.equal(selects(pattern, type), expected);
  } catch {
    failed += 1;
    console.error(`selects(${JSON.stringify(pattern)}, ${JSON.stringify(type)}) is not ${expected}`);
  }
}
if (failed > 0) process.exit(1);
console.log(`${table.cases.length} pattern cases agree with core::matching`);
