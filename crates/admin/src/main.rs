//! `herald-admin`: the webhooks HTTP API; see the library. With
//! `dead-letters …` it is instead the operator's tool for the dead letters.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("dead-letters") {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        return match runtime.block_on(herald_admin::dead_letters::run(
            &args[1..],
            &herald_platform::config::Env,
        )) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("herald-admin dead-letters: {error}");
                match error {
                    herald_admin::dead_letters::CommandError::Usage(_) => ExitCode::from(2),
                    _ => ExitCode::from(1),
                }
            }
        };
    }
    herald_platform::service::main(
        "admin",
        herald_admin::Config::from_source,
        herald_admin::run,
    )
}
