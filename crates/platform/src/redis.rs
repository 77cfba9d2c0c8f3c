//! The Redis connection. Redis only holds what can be rebuilt, so a service
//! must keep working while it is down: [`Redis::conn`] answers `None` at
//! once instead of waiting, and reconnects in the background.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    state: Arc<Mutex<State>>,
    timeout: Duration,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").finish_non_exhaustive()
    }
}

struct State {
    conn: Option<ConnectionManager>,
    last_attempt: Option<Instant>,
}

impl Redis {
    /// `timeout` bounds every command; a slow Redis counts as a down one.
    pub fn new(url: &str, timeout: Duration) -> redis::RedisResult<Self> {
        Ok(Self {
            client: redis::Client::open(url)?,
            state: Arc::new(Mutex::new(State {
                conn: None,
                last_attempt: None,
            })),
            timeout,
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A connection, or `None` when Redis cannot be reached now. Connecting
    /// is retried at most every 500 ms so a down Redis costs nothing.
    pub async fn conn(&self) -> Option<ConnectionManager> {
        let mut state = self.state.lock().await;
        if let Some(conn) = &state.conn {
            return Some(conn.clone());
        }
        if state
            .last_attempt
            .is_some_and(|t| t.elapsed() < Duration::from_millis(500))
        {
            return None;
        }
        state.last_attempt = Some(Instant::now());
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        match tokio::time::timeout(
            self.timeout * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        {
            Ok(Ok(conn)) => {
                state.conn = Some(conn.clone());
                Some(conn)
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "redis unavailable");
                None
            }
            Err(_) => {
                tracing::warn!("redis connect timed out");
                None
            }
        }
    }

    /// Waits until Redis answers or `shutdown`; for services that cannot do
    /// anything useful without it (log-writer).
    pub async fn wait_ready(
        &self,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Option<ConnectionManager> {
        loop {
            if let Some(conn) = self.conn().await {
                return Some(conn);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    pub async fn ping(&self) -> bool {
        let Some(mut conn) = self.conn().await else {
            return false;
        };
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(tokio::time::timeout(self.timeout, ping).await, Ok(Ok(_)))
    }
}
