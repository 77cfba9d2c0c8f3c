//! `herald-matcher`: fans events out to webhooks; see the library.

fn main() -> std::process::ExitCode {
    herald_platform::service::main(
        "matcher",
        herald_matcher::Config::from_source,
        herald_matcher::run,
    )
}
