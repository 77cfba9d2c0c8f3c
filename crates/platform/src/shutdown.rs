//! SIGTERM and SIGINT become a cancellation token that is passed into each
//! service's `run`; a second signal exits at once. A service that has not
//! drained within its grace period is stopped by [`within_grace`], and the
//! messages a consumer had pulled but not started are handed back to NATS by
//! [`hand_back`], so another replica takes them at once.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT. On the second, the
/// process exits with 130 without draining. The handlers are installed
/// before this returns, so a signal sent once the service answers is never
/// the default (immediate) termination.
pub fn on_signals() -> CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown requested, draining (signal again to exit now)");
        cancel.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal, exiting without draining");
        std::process::exit(130);
    });
    token
}

/// Runs `run` to completion, unless it is still draining `grace` after
/// `shutdown` was cancelled: then `None`.
pub async fn within_grace<T>(
    run: impl Future<Output = T>,
    shutdown: CancellationToken,
    grace: Duration,
) -> Option<T> {
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = run => Some(result),
        () = deadline => None,
    }
}

/// After a consumer stopped taking work: naks the messages already pulled
/// into `messages` but not started, so NATS redelivers them to a running
/// replica now rather than after the ack wait. Bounded to two seconds.
pub async fn hand_back<S>(messages: &mut S)
where
    S: Stream<Item = Result<Message, async_nats::jetstream::consumer::pull::MessagesError>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut handed_back = 0usize;
    loop {
        let next = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
            messages.next(),
        );
        match next.await {
            Ok(Some(Ok(message))) => {
                // A short delay keeps the message from coming straight back
                // to this consumer's last pull.
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                    .await;
                handed_back += 1;
            }
            Ok(Some(Err(_))) => continue,
            Ok(None) | Err(_) => break,
        }
    }
    if handed_back > 0 {
        tracing::info!(handed_back, "messages pulled but not started handed back");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_service_that_drains_in_time_finishes() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let run = async {
            tokio::time::sleep(Duration::from_secs(29)).await;
            7
        };
        assert_eq!(
            within_grace(run, shutdown, Duration::from_secs(30)).await,
            Some(7)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_still_draining_after_the_grace_is_stopped() {
        let shutdown = CancellationToken::new();
        let cancel = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            cancel.cancel();
        });
        let started = tokio::time::Instant::now();
        let run = std::future::pending::<()>();
        assert_eq!(
            within_grace(run, shutdown, Duration::from_secs(30)).await,
            None
        );
        // Running for an hour before the signal is fine; only draining is timed.
        assert_eq!(started.elapsed(), Duration::from_secs(3630));
    }
}
