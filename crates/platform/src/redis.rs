//! The Redis connection. Redis only holds what can be rebuilt, so a service
//! must keep working while it is down: [`Redis::conn`] answers `None` at
//! once instead of waiting, and reconnects in the background.
//!
//! One server (`redis://host:port`) or a Redis Cluster: several
//! comma-separated node URLs, or `redis+cluster://host:port[,host:port…]`.
//! Against a cluster every command and script Herald sends touches keys of
//! one hash slot only (each key names its slot with a `{…}` hash tag), so
//! [`Conn`] is used the same way for both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use tokio::sync::Mutex;

use crate::config::Invalid;

/// A connection to one server or to a cluster; cheap to clone.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

#[derive(Clone)]
enum Client {
    Single(Box<redis::Client>),
    Cluster(Box<ClusterClient>),
}

/// The node URLs of a Redis URL setting, and whether it names a cluster.
/// `rediss://` (and `rediss+cluster://`) is Redis over TLS, checked
/// against the system's root certificates.
pub fn parse_url(url: &str) -> Result<(Vec<String>, bool), Invalid> {
    let url = url.trim();
    let cluster_form = ["redis+cluster://", "rediss+cluster://"]
        .iter()
        .find_map(|prefix| url.strip_prefix(prefix).map(|rest| (prefix, rest)));
    let (nodes, cluster): (Vec<String>, bool) = match cluster_form {
        Some((prefix, rest)) => {
            let scheme = prefix.trim_end_matches("+cluster://");
            // `redis+cluster://user:pass@a:1,b:2/`: credentials apply to all.
            let (auth, hosts) = match rest.rsplit_once('@') {
                Some((auth, hosts)) => (format!("{auth}@"), hosts),
                None => (String::new(), rest),
            };
            let nodes = hosts
                .trim_end_matches('/')
                .split(',')
                .map(|h| format!("{scheme}://{auth}{}", h.trim()))
                .collect();
            (nodes, true)
        }
        None => (
            url.split(',').map(|u| u.trim().to_owned()).collect(),
            url.contains(','),
        ),
    };
    if nodes
        .iter()
        .any(|n| n.is_empty() || n.ends_with("://") || n.ends_with("@"))
    {
        return Err(Invalid("an empty node in the list".into()));
    }
    for node in &nodes {
        redis::Client::open(node.as_str()).map_err(|e| Invalid(format!("{node:?}: {e}")))?;
    }
    Ok((nodes, cluster))
}

#[derive(Clone)]
pub struct Redis {
    client: Client,
    state: Arc<Mutex<State>>,
    timeout: Duration,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").finish_non_exhaustive()
    }
}

struct State {
    conn: Option<Conn>,
    last_attempt: Option<Instant>,
}

impl Redis {
    /// `timeout` bounds every command; a slow Redis counts as a down one.
    /// `url` is one server's URL, or a cluster's nodes (see the module).
    pub fn new(url: &str, timeout: Duration) -> redis::RedisResult<Self> {
        let (nodes, cluster) = parse_url(url).map_err(|invalid| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "bad redis url",
                invalid.0,
            ))
        })?;
        let client = if cluster {
            Client::Cluster(Box::new(
                ClusterClient::builder(nodes)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(1)
                    .build()?,
            ))
        } else {
            Client::Single(Box::new(redis::Client::open(nodes[0].as_str())?))
        };
        Ok(Self {
            client,
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

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.client, Client::Cluster(_))
    }

    async fn connect(&self) -> redis::RedisResult<Conn> {
        match &self.client {
            Client::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_with_config(client.as_ref().clone(), config)
                    .await
                    .map(Conn::Single)
            }
            Client::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
        }
    }

    /// A connection, or `None` when Redis cannot be reached now. Connecting
    /// is retried at most every 500 ms so a down Redis costs nothing.
    pub async fn conn(&self) -> Option<Conn> {
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
        match tokio::time::timeout(self.timeout * 2, self.connect()).await {
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
    pub async fn wait_ready(&self, shutdown: &tokio_util::sync::CancellationToken) -> Option<Conn> {
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

    /// Runs `f` on a connection within the timeout: `None` when Redis is
    /// down, slow or refuses (the error is logged with `what`).
    pub async fn run<T, F, Fut>(&self, what: &str, f: F) -> Option<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn().await?;
        match tokio::time::timeout(self.timeout, f(conn)).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(error)) => {
                tracing::warn!(%error, what, "redis command failed");
                None
            }
            Err(_) => {
                tracing::warn!(what, "redis command timed out");
                None
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_one_server_or_a_cluster() {
        let ok = |url: &str| parse_url(url).unwrap();
        assert_eq!(ok("redis://a:1"), (vec!["redis://a:1".to_owned()], false));
        assert_eq!(
            ok("redis://a:1, redis://b:2"),
            (
                vec!["redis://a:1".to_owned(), "redis://b:2".to_owned()],
                true
            )
        );
        assert_eq!(
            ok("redis+cluster://a:1,b:2"),
            (
                vec!["redis://a:1".to_owned(), "redis://b:2".to_owned()],
                true
            )
        );
        assert_eq!(
            ok("redis+cluster://u:p@a:1,b:2/"),
            (
                vec!["redis://u:p@a:1".to_owned(), "redis://u:p@b:2".to_owned()],
                true
            )
        );
        assert!(ok("redis+cluster://a:1").1);
        assert_eq!(ok("rediss://a:1"), (vec!["rediss://a:1".to_owned()], false));
        assert_eq!(
            ok("rediss+cluster://u:p@a:1,b:2"),
            (
                vec!["rediss://u:p@a:1".to_owned(), "rediss://u:p@b:2".to_owned()],
                true
            )
        );
        for bad in [
            "redis://a:1,",
            "nope://x",
            "redis+cluster://",
            "rediss+cluster://",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
