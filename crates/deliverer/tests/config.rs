//! The `herald-deliverer` binary refuses a bad configuration before it
//! connects to anything: exit 64 and a message naming the variable.

use std::process::Command;

fn run(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_herald-deliverer"))
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run herald-deliverer");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_bad_variable_stops_it_with_64_naming_the_variable() {
    let key = herald_core::secret::Keyring::generate_key_text();
    let (code, stderr) = run(&[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("HERALD_SECRET_KEY"), "{stderr}");
    for (var, value) in [
        ("HERALD_DISABLE_AFTER", "abc"),
        ("HERALD_RETRY_SCHEDULE", "5s,soon"),
        ("HERALD_ALLOW_PRIVATE_TARGETS", "maybe"),
        ("HERALD_DELIVERER_HEALTH_ADDR", "nope"),
        ("HERALD_DELIVERY_CONCURRENCY", "0"),
        ("HERALD_REDIS_URL", "mongodb://x"),
    ] {
        let (code, stderr) = run(&[("HERALD_SECRET_KEY", &key), (var, value)]);
        assert_eq!(code, Some(64), "{var}={value}: {stderr}");
        assert!(stderr.contains(var), "{var}={value}: {stderr}");
    }
}
