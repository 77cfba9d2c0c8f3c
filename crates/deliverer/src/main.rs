//! `herald-deliverer`: POSTs delivery jobs to webhook URLs; see the library.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    herald_platform::service::main(
        "deliverer",
        herald_deliverer::Config::from_source,
        herald_deliverer::run,
    )
}
