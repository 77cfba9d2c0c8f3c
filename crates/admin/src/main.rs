//! `herald-admin`: the webhooks HTTP API; see the library.

#[global_allocator]
static ALLOCATOR: herald_platform::Allocator = herald_platform::Allocator {};

fn main() -> std::process::ExitCode {
    herald_platform::service::main(
        "admin",
        herald_admin::Config::from_source,
        herald_admin::run,
    )
}
