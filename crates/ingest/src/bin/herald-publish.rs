//! `herald-publish [--url nats://...] [--id <msg id>] <subject> <json>`:
//! publishes one event with a JetStream publish and prints the ack, for the
//! dev stack's tour and for scripts on machines without the `nats` CLI.

use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    // The environment, as the services read it; `--url` replaces HERALD_NATS_URL.
    let mut env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let mut msg_id = None;
    let mut positional = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--url" => {
                env.insert(
                    herald_platform::config::NATS_URL.into(),
                    args.next().unwrap_or_default(),
                );
            }
            "--id" => msg_id = args.next(),
            _ => positional.push(arg),
        }
    }
    let [subject, body] = positional.as_slice() else {
        eprintln!(
            "usage: herald-publish [--url nats://host:4222] [--id msg-id] <subject> <json body>"
        );
        return ExitCode::from(64);
    };
    let nats = match herald_platform::config::Nats::from_source(&env) {
        Ok(nats) => nats,
        Err(error) => {
            eprintln!("herald-publish: {error}");
            return ExitCode::from(64);
        }
    };
    let client = match herald_platform::nats::connect_once(&nats, "herald-publish").await {
        Ok(client) => client,
        Err(error) => {
            eprintln!("{error} (at {})", nats.urls());
            return ExitCode::FAILURE;
        }
    };
    let js = async_nats::jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    if let Some(id) = msg_id {
        headers.insert(herald_core::names::MSG_ID_HEADER, id.as_str());
    }
    let result = match js
        .publish_with_headers(subject.clone(), headers, body.clone().into())
        .await
    {
        Ok(ack) => ack.await.map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    match result {
        Ok(ack) => {
            println!(
                "published to {} seq {}{}",
                ack.stream,
                ack.sequence,
                if ack.duplicate { " (duplicate)" } else { "" }
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("publish failed: {error}");
            ExitCode::FAILURE
        }
    }
}
