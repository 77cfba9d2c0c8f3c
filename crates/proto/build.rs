//! Compiles `proto/` into OUT_DIR. protoc comes from `PROTOC` when set, else
//! from the vendored binary, so the build needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not when it is compiled: worktrees sharing
    // one target directory share the compiled script too.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR unset")?;
    let root = std::path::Path::new(&manifest_dir).join("../../proto");
    let file = root.join("herald/v1/herald.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    println!("cargo:rerun-if-env-changed=PROTOC");
    let mut config = prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    config.bytes(["."]).compile_protos(&[file], &[root])?;
    Ok(())
}
