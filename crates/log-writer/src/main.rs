//! `herald-log-writer`: indexes delivery attempts; see the library.

fn main() -> std::process::ExitCode {
    herald_platform::service::main(
        "log-writer",
        herald_log_writer::Config::from_source,
        herald_log_writer::run,
    )
}
