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

use herald_platform::config::{ConfigError, Nats, Source};
use herald_platform::dead_letters;

pub const USAGE: &str = "usage: herald-admin dead-letters list [--from SEQ] [--limit N]
       herald-admin dead-letters redrive SEQ...|all
       herald-admin dead-letters discard SEQ...";

/// Why a command did nothing.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Not a command: what to type instead.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{source} (at {urls})")]
    Connect {
        urls: String,
        source: herald_platform::nats::Error,
    },
    #[error(transparent)]
    DeadLetters(#[from] dead_letters::Error),
}

impl CommandError {
    fn usage() -> Self {
        CommandError::Usage(USAGE.into())
    }
}

/// Runs the subcommand with `args` (after `dead-letters`); what it prints,
/// or the error to print before exiting non-zero.
pub async fn run(args: &[String], src: &dyn Source) -> Result<String, CommandError> {
    let nats = Nats::from_source(src)?;
    let (command, rest) = args.split_first().ok_or_else(CommandError::usage)?;
    let client = herald_platform::nats::connect_once(&nats, "herald-admin-dead-letters")
        .await
        .map_err(|source| CommandError::Connect {
            urls: nats.urls(),
            source,
        })?;
    let js = herald_platform::nats::jetstream(client);
    let mut out = String::new();
    match command.as_str() {
        "list" => {
            let (mut from, mut limit) = (0u64, 100usize);
            let mut it = rest.iter();
            while let Some(flag) = it.next() {
                let value = it.next().ok_or_else(CommandError::usage)?;
                match flag.as_str() {
                    "--from" => {
                        from = value.parse().map_err(|_| {
                            CommandError::Usage(format!("--from {value:?} is not a sequence"))
                        })?
                    }
                    "--limit" => {
                        limit = value.parse().map_err(|_| {
                            CommandError::Usage(format!("--limit {value:?} is not a number"))
                        })?
                    }
                    _ => return Err(CommandError::usage()),
                }
            }
            for letter in dead_letters::list(&js, from, limit).await? {
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
                    .await?
                    .into_iter()
                    .map(|l| l.seq)
                    .collect()
            } else {
                sequences(rest)?
            };
            for seq in seqs {
                let letter = dead_letters::redrive(&js, seq).await?;
                let _ = writeln!(out, "redriven {seq} to {}", letter.subject);
            }
        }
        "discard" => {
            for seq in sequences(rest)? {
                dead_letters::discard(&js, seq).await?;
                let _ = writeln!(out, "discarded {seq}");
            }
        }
        _ => return Err(CommandError::usage()),
    }
    Ok(out)
}

fn sequences(args: &[String]) -> Result<Vec<u64>, CommandError> {
    if args.is_empty() {
        return Err(CommandError::usage());
    }
    args.iter()
        .map(|a| {
            a.parse()
                .map_err(|_| CommandError::Usage(format!("{a:?} is not a dead letter's sequence")))
        })
        .collect()
}
