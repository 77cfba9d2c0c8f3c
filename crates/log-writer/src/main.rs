//! `herald-log-writer`: indexes delivery attempts; see the library.

#[global_allocator]
static ALLOCATOR: herald_platform::Allocator = herald_platform::Allocator {};

fn main() -> std::process::ExitCode {
    herald_platform::service::main(
        "log-writer",
        herald_log_writer::Config::from_source,
        herald_log_writer::run,
    )
}
