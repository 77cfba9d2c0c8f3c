//! `herald-log-writer`: indexes delivery attempts; see the library.
//! `herald-log-writer rebuild` replays the attempts stream into the index
//! once and exits.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => herald_platform::service::main(
            "log-writer",
            herald_log_writer::Config::from_source,
            herald_log_writer::run,
        ),
        ["rebuild"] => herald_platform::service::main(
            "log-writer",
            herald_log_writer::Config::from_source,
            herald_log_writer::rebuild_now,
        ),
        _ => {
            eprintln!("usage: herald-log-writer [rebuild]");
            ExitCode::from(herald_platform::service::EXIT_CONFIG)
        }
    }
}
