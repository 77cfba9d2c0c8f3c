//! `herald-admin`: the webhooks HTTP API; see the library.

fn main() -> std::process::ExitCode {
    herald_platform::service::main(
        "admin",
        herald_admin::Config::from_source,
        herald_admin::run,
    )
}
