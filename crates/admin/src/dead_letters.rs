//! `herald-admin dead-letters …`: the operator's tool for `HERALD_DEAD`
//! (what a consumer could not process; `herald_platform::dead_letters`).
//!
//! ```text
//! herald-admin dead-letters list [--from SEQ] [--limit N]   one JSON line each
//! herald-admin dead-letters redrive SEQ…|all                send back where it came from
//! herald-admin dead-letters discard SEQ…                    remove for good
//! ```
//!
//! It reads `HERALD_NATS_URL` like the services.

use std::fmt::Write as _;

use herald_platform::config::{Nats, Source};
use herald_platform::dead_letters;

pub const USAGE: &str = "usage: herald-admin dead-letters list [--from SEQ] [--limit N]
       herald-admin dead-letters redrive SEQ...|all
       herald-admin dead-letters discard SEQ...";

/// Runs the subcommand with `args` (after `dead-letters`); what it prints,
/// or the error to print before exiting non-zero.
pub async fn run(args: &[String], src: &dyn Source) -> Result<String, String> {
    let nats = Nats::from_source(src).map_err(|e| e.to_string())?;
    let (command, rest) = args.split_first().ok_or(USAGE)?;
    let client = herald_platform::nats::connect_once(&nats, "herald-admin-dead-letters")
        .await
        .map_err(|e| format!("{e} (at {})", nats.urls()))?;
    let js = herald_platform::nats::jetstream(client);
    let mut out = String::new();
    match command.as_str() {
        "list" => {
            let (mut from, mut limit) = (0u64, 100usize);
            let mut it = rest.iter();
            while let Some(flag) = it.next() {
                let value = it.next().ok_or(USAGE)?;
                match flag.as_str() {
                    "--from" => {
                        from = value
                            .parse()
                            .map_err(|_| format!("--from {value:?} is not a sequence"))?
                    }
                    "--limit" => {
                        limit = value
                            .parse()
                            .map_err(|_| format!("--limit {value:?} is not a number"))?
                    }
                    _ => return Err(USAGE.into()),
                }
            }
            for letter in dead_letters::list(&js, from, limit)
                .await
                .map_err(|e| e.to_string())?
            {
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::to_string(&letter).unwrap_or_default()
                );
            }
        }
        "redrive" => {
            let seqs = if rest.len() == 1 && rest[0] == "all" {
                dead_letters::list(&js, 0, usize::MAX)
                    .await
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .map(|l| l.seq)
                    .collect()
            } else {
                sequences(rest)?
            };
            for seq in seqs {
                let letter = dead_letters::redrive(&js, seq)
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = writeln!(out, "redriven {seq} to {}", letter.subject);
            }
        }
        "discard" => {
            for seq in sequences(rest)? {
                dead_letters::discard(&js, seq)
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = writeln!(out, "discarded {seq}");
            }
        }
        _ => return Err(USAGE.into()),
    }
    Ok(out)
}

fn sequences(args: &[String]) -> Result<Vec<u64>, String> {
    if args.is_empty() {
        return Err(USAGE.into());
    }
    args.iter()
        .map(|a| {
            a.parse()
                .map_err(|_| format!("{a:?} is not a dead letter's sequence"))
        })
        .collect()
}
