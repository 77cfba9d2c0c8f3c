//! Per-endpoint concurrency: at most `HERALD_ENDPOINT_CONCURRENCY` requests
//! in flight to one webhook, so a slow or dead URL can hold only that many
//! of the deliverer's global slots. A job that finds its endpoint saturated
//! is deferred (put back as a short server-side schedule) instead of
//! waiting in a slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// (organization, webhook id)
pub type Key = (String, String);

type Map = Arc<Mutex<HashMap<Key, Arc<Semaphore>>>>;

/// The permits of every endpoint with requests in flight.
pub struct Limits {
    per_endpoint: usize,
    map: Map,
}

/// A turn at one endpoint; the endpoint is forgotten when its last turn
/// ends.
pub struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    key: Key,
    map: Map,
}

impl Drop for Permit {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut map = self.map.lock().expect("endpoints lock");
        // Only the map holds it: nobody is in flight or waiting.
        if map
            .get(&self.key)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            map.remove(&self.key);
        }
    }
}

impl Limits {
    pub fn new(per_endpoint: usize) -> Self {
        Self {
            per_endpoint,
            map: Arc::default(),
        }
    }

    fn semaphore(&self, key: &Key) -> Arc<Semaphore> {
        self.map
            .lock()
            .expect("endpoints lock")
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_endpoint)))
            .clone()
    }

    fn permit(&self, key: &Key, permit: OwnedSemaphorePermit) -> Permit {
        Permit {
            permit: Some(permit),
            key: key.clone(),
            map: self.map.clone(),
        }
    }

    /// A turn now, or `None` when the endpoint is saturated.
    pub fn try_acquire(&self, key: &Key) -> Option<Permit> {
        let permit = self.semaphore(key).try_acquire_owned().ok()?;
        Some(self.permit(key, permit))
    }

    /// Waits for a turn.
    pub async fn acquire(&self, key: &Key) -> Permit {
        let semaphore = self.semaphore(key);
        let permit = semaphore
            .acquire_owned()
            .await
            .expect("endpoint semaphores are never closed");
        self.permit(key, permit)
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.map.lock().expect("endpoints lock").len()
    }
}

/// How long a deferred job waits before trying its endpoint again: 100 ms
/// doubling to 5 s, plus up to 50% jitter (`jitter` in `[0, 1)`) so that
/// deferred jobs do not come back all at once.
pub fn deferral_delay(deferrals: u32, jitter: f64) -> Duration {
    let base = Duration::from_millis(100)
        .saturating_mul(1 << deferrals.min(6))
        .min(Duration::from_secs(5));
    base.mul_f64(1.0 + 0.5 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> Key {
        ("acme".into(), id.into())
    }

    #[test]
    fn endpoints_are_limited_independently() {
        let limits = Limits::new(2);
        let a1 = limits.try_acquire(&key("a")).expect("first");
        let a2 = limits.try_acquire(&key("a")).expect("second");
        assert!(limits.try_acquire(&key("a")).is_none(), "a is saturated");
        let b = limits.try_acquire(&key("b"));
        assert!(b.is_some(), "b is not affected by a");
        drop(a1);
        let a3 = limits.try_acquire(&key("a")).expect("a has room again");
        drop((a2, a3, b));
        assert_eq!(limits.tracked(), 0, "idle endpoints are forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_the_next_turn() {
        let limits = Arc::new(Limits::new(1));
        let held = limits.try_acquire(&key("a")).unwrap();
        let waiter = {
            let limits = limits.clone();
            tokio::spawn(async move {
                let _turn = limits.acquire(&key("a")).await;
                tokio::time::Instant::now()
            })
        };
        let start = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!waiter.is_finished(), "waits while the endpoint is busy");
        drop(held);
        let got_at = waiter.await.unwrap();
        assert_eq!(got_at - start, Duration::from_secs(3));
        assert_eq!(limits.tracked(), 0);
    }

    #[test]
    fn deferral_delays_grow_and_are_bounded() {
        let ms = |d: u32, j: f64| deferral_delay(d, j).as_millis();
        assert_eq!(ms(0, 0.0), 100);
        assert_eq!(ms(1, 0.0), 200);
        assert_eq!(ms(5, 0.0), 3_200);
        assert_eq!(ms(6, 0.0), 5_000);
        assert_eq!(ms(1_000, 0.0), 5_000);
        assert_eq!(ms(0, 1.0), 150);
        assert_eq!(ms(u32::MAX, 0.99), 7_475);
    }
}
