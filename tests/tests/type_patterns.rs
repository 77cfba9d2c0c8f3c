//! The console's event-type pattern rule agrees with `core::matching`:
//! `tests/console/patterns.mjs` runs `selects` from the console's
//! `catalogue.js` over the same table of cases core's unit test reads
//! (`crates/core/tests/type_patterns.json`). Needs node, not a browser;
//! under `CI=true` a missing node fails the test, elsewhere it skips loudly.

use std::path::Path;

#[test]
fn the_console_selects_types_as_core_matches_them() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("console/patterns.mjs");
    let output = match std::process::Command::new("node").arg(&script).output() {
        Ok(output) => output,
        Err(error) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIPPED: cannot run node ({error})");
            return;
        }
        Err(error) => panic!("cannot run node: {error}"),
    };
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
