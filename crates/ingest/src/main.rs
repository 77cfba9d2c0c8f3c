//! `herald-ingest`: validates producers' events; see the library.

fn main() -> std::process::ExitCode {
    herald_platform::service::main(
        "ingest",
        herald_ingest::Config::from_source,
        herald_ingest::run,
    )
}
