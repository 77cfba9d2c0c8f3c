//! Per-endpoint concurrency: at most `HERALD_ENDPOINT_CONCURRENCY` requests
//! in flight to one webhook, so a slow or dead URL can hold only that many
//! of the deliverer's global slots. The limit adapts (additive increase,
//! multiplicative decrease, `core::policy::next_limit`): halved when the
//! endpoint throttles, one more per limit's worth of successes. A lowered
//! limit outlives the endpoint's last request by [`REMEMBERED`], so a
//! throttled endpoint, paused with nothing in flight, resumes at the limit
//! it had rather than at the whole cap. It follows the endpoint's
//! latency too (`core::fairness::endpoint_limit`, on an average of its
//! recent requests): up to a second a request it may have the whole cap, a
//! slower one fewer in proportion (a 10 s endpoint a tenth), so slow
//! receivers cannot soak up slots that fast ones turn over many times.
//!
//! A job that finds its endpoint at the limit waits for a turn only while
//! the endpoint is *moving*: a request to it finished within the last
//! [`STALL`]. Then turns come round quickly and waiting is the cheapest
//! thing to do (a fast endpoint may use every global slot). An endpoint
//! with no request finished for longer is stalled: a job for it is deferred
//! (put back as a short server-side schedule) at once, and a waiter that
//! gets no turn within [`STALL`] is deferred too, so a slow or dead URL
//! never holds more than a brief share of the slots. Nothing ever waits for
//! a turn without a time limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// (organization, webhook id)
pub type Key = (String, String);

/// How long an endpoint may go without finishing a request and still count
/// as moving; also the longest a job waits for a turn.
pub const STALL: Duration = Duration::from_millis(250);

/// How long an endpoint's lowered limit is remembered once nothing is in
/// flight to it (its pauses last up to a minute; a receiver quiet for ten
/// starts afresh).
pub const REMEMBERED: Duration = Duration::from_secs(600);

struct Endpoint {
    semaphore: Arc<Semaphore>,
    /// The most in flight: `HERALD_ENDPOINT_CONCURRENCY`.
    cap: usize,
    /// Requests allowed in flight now (at most the semaphore's size), an
    /// `f64`'s bits: it grows by fractions.
    limit: AtomicU64,
    /// When a request to it last finished (or when it was first seen).
    last_done: Mutex<Instant>,
    /// How long its requests take, in ms: a moving average (0: none yet).
    latency_ms: AtomicU64,
}

impl Endpoint {
    /// The limit now: the adaptive one, lowered for a slow endpoint.
    fn limit(&self) -> usize {
        let latency = self.latency_ms.load(Ordering::Relaxed);
        (f64::from_bits(self.limit.load(Ordering::Relaxed)) as usize)
            .clamp(1, self.cap.max(1))
            .min(herald_core::fairness::endpoint_limit(self.cap, latency))
    }

    /// Adds one request's time to the average (each new one weighs 1/4).
    fn took(&self, took: Duration) {
        let sample = took.as_millis().min(u64::MAX as u128) as u64;
        let _ = self
            .latency_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| {
                Some(if avg == 0 {
                    sample.max(1)
                } else {
                    ((avg * 3 + sample) / 4).max(1)
                })
            });
    }
}

#[derive(Default)]
struct Endpoints {
    /// Every endpoint with a request in flight or waiting for a turn.
    active: HashMap<Key, Arc<Endpoint>>,
    /// Limits below the cap of endpoints with nothing in flight, and when
    /// their last request ended.
    lowered: HashMap<Key, (f64, Instant)>,
}

type Map = Arc<Mutex<Endpoints>>;

/// The permits of every endpoint with requests in flight.
pub struct InFlight {
    per_endpoint: usize,
    map: Map,
}

/// A turn at one endpoint; the endpoint is forgotten when its last turn
/// ends.
pub struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    endpoint: Option<Arc<Endpoint>>,
    key: Key,
    map: Map,
    /// When the turn was taken: the request's time, when it ends.
    taken: Instant,
}

impl Permit {
    /// Adapts the endpoint's limit to how the request went: throttled, or
    /// accepted. Called before the turn ends, so that the last request's
    /// answer is not lost with the endpoint.
    pub fn answered(&self, throttled: bool) {
        let Some(endpoint) = &self.endpoint else {
            return;
        };
        let cap = endpoint.cap;
        let _ = endpoint
            .limit
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let limit = herald_core::policy::next_limit(f64::from_bits(bits), cap, throttled);
                Some(limit.to_bits())
            });
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let now = Instant::now();
        if let Some(endpoint) = self.endpoint.take() {
            *endpoint.last_done.lock().expect("endpoint lock") = now;
            endpoint.took(self.taken.elapsed());
        }
        drop(self.permit.take());
        let mut map = self.map.lock().expect("endpoints lock");
        // Only the map holds it: nobody is in flight or waiting.
        if map
            .active
            .get(&self.key)
            .is_some_and(|s| Arc::strong_count(s) == 1)
            && let Some(endpoint) = map.active.remove(&self.key)
        {
            let limit = f64::from_bits(endpoint.limit.load(Ordering::Relaxed));
            if limit < endpoint.cap as f64 {
                // Only throttled endpoints going quiet pay for the pruning.
                map.lowered
                    .retain(|_, (_, since)| now.duration_since(*since) < REMEMBERED);
                map.lowered.insert(self.key.clone(), (limit, now));
            }
        }
    }
}

impl InFlight {
    pub fn new(per_endpoint: usize) -> Self {
        Self {
            per_endpoint,
            map: Arc::default(),
        }
    }

    fn endpoint(&self, key: &Key) -> Arc<Endpoint> {
        let mut map = self.map.lock().expect("endpoints lock");
        if let Some(endpoint) = map.active.get(key) {
            return endpoint.clone();
        }
        let now = Instant::now();
        let limit = map
            .lowered
            .remove(key)
            .filter(|(_, since)| now.duration_since(*since) < REMEMBERED)
            .map_or(self.per_endpoint as f64, |(limit, _)| limit);
        let endpoint = Arc::new(Endpoint {
            semaphore: Arc::new(Semaphore::new(self.per_endpoint)),
            cap: self.per_endpoint,
            limit: AtomicU64::new(limit.to_bits()),
            last_done: Mutex::new(now),
            latency_ms: AtomicU64::new(0),
        });
        map.active.insert(key.clone(), endpoint.clone());
        endpoint
    }

    fn permit(&self, key: &Key, endpoint: Arc<Endpoint>, permit: OwnedSemaphorePermit) -> Permit {
        Permit {
            permit: Some(permit),
            endpoint: Some(endpoint),
            key: key.clone(),
            map: self.map.clone(),
            taken: Instant::now(),
        }
    }

    /// A turn now, or `None` when the endpoint is at its limit.
    #[cfg(test)]
    pub fn try_acquire(&self, key: &Key) -> Option<Permit> {
        let endpoint = self.endpoint(key);
        let permit = endpoint.semaphore.clone().try_acquire_owned().ok()?;
        Some(self.permit(key, endpoint, permit))
    }

    /// A turn now, or after a short wait while the endpoint is moving;
    /// `None` when it is stalled or at its lowered limit (the job should be
    /// deferred).
    pub async fn acquire_if_moving(&self, key: &Key) -> Option<Permit> {
        let endpoint = self.endpoint(key);
        let limit = endpoint.limit();
        let in_flight = self.per_endpoint - endpoint.semaphore.available_permits();
        if in_flight >= limit && limit < self.per_endpoint {
            return None;
        }
        if let Ok(permit) = endpoint.semaphore.clone().try_acquire_owned() {
            return Some(self.permit(key, endpoint, permit));
        }
        let last_done = *endpoint.last_done.lock().expect("endpoint lock");
        if last_done.elapsed() > STALL {
            return None;
        }
        let permit = tokio::time::timeout(STALL, endpoint.semaphore.clone().acquire_owned())
            .await
            .ok()?
            .expect("endpoint semaphores are never closed");
        Some(self.permit(key, endpoint, permit))
    }

    #[cfg(test)]
    fn limit(&self, key: &Key) -> Option<usize> {
        let map = self.map.lock().expect("endpoints lock");
        map.active.get(key).map(|e| e.limit())
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.map.lock().expect("endpoints lock").active.len()
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
        let limits = InFlight::new(2);
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
    async fn a_moving_endpoint_is_waited_for_and_a_stalled_one_is_not() {
        let limits = InFlight::new(1);
        let held = limits.try_acquire(&key("a")).unwrap();
        // Just seen: moving; the turn comes when the holder finishes.
        let a = key("a");
        let waiting = limits.acquire_if_moving(&a);
        tokio::pin!(waiting);
        tokio::select! {
            _ = &mut waiting => panic!("no turn while held"),
            _ = tokio::time::sleep(STALL / 2) => {}
        }
        drop(held);
        let turn = waiting.await.expect("a turn after the holder finished");
        // Held for longer than STALL with nothing finished: stalled.
        tokio::time::sleep(STALL * 2).await;
        assert!(limits.acquire_if_moving(&key("a")).await.is_none());
        drop(turn);
        // Something finished just now: moving again, and free.
        assert!(limits.acquire_if_moving(&key("a")).await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_on_a_busy_endpoint_gives_up_after_the_stall_time() {
        let limits = InFlight::new(1);
        let _held = limits.try_acquire(&key("a")).unwrap();
        let start = Instant::now();
        assert!(limits.acquire_if_moving(&key("a")).await.is_none());
        assert_eq!(start.elapsed(), STALL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttling_endpoint_gets_fewer_requests_in_flight() {
        let limits = InFlight::new(4);
        let a = key("a");
        let first = limits.acquire_if_moving(&a).await.expect("a turn");
        first.answered(true);
        assert_eq!(limits.limit(&a), Some(2));
        let second = limits.acquire_if_moving(&a).await.expect("under the limit");
        // At the lowered limit: deferred, though the semaphore has room.
        assert!(limits.acquire_if_moving(&a).await.is_none());
        // One more for about a limit's worth of successes: 2, 2.5, 2.9, 3.2.
        first.answered(false);
        second.answered(false);
        assert_eq!(limits.limit(&a), Some(2));
        second.answered(false);
        assert_eq!(limits.limit(&a), Some(3));
        let third = limits
            .acquire_if_moving(&a)
            .await
            .expect("one more allowed");
        drop((first, second, third));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lowered_limit_outlives_the_last_request_for_a_while() {
        let limits = InFlight::new(8);
        let a = key("a");
        // The last request in flight is throttled: the endpoint is paused
        // with nothing in flight, and comes back at its lowered limit.
        let only = limits.acquire_if_moving(&a).await.expect("a turn");
        only.answered(true);
        drop(only);
        assert_eq!(limits.tracked(), 0, "idle endpoints are forgotten");
        let again = limits.acquire_if_moving(&a).await.expect("a turn");
        assert_eq!(limits.limit(&a), Some(4));
        drop(again);
        // Quiet for longer than REMEMBERED: the whole cap again.
        tokio::time::sleep(REMEMBERED).await;
        let later = limits.acquire_if_moving(&a).await.expect("a turn");
        assert_eq!(limits.limit(&a), Some(8));
        drop(later);
        // A limit grown back to the cap is not kept at all.
        let b = key("b");
        let turn = limits.acquire_if_moving(&b).await.expect("a turn");
        turn.answered(false);
        drop(turn);
        assert!(limits.map.lock().unwrap().lowered.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_endpoint_gets_fewer_requests_in_flight() {
        let limits = InFlight::new(32);
        let (slow, fast) = (key("slow"), key("fast"));
        let held = limits.try_acquire(&slow).expect("a turn");
        let quick = limits.try_acquire(&fast).expect("a turn");
        // Kept alive by another turn, so the endpoints are remembered.
        let _slow_kept = limits.try_acquire(&slow).expect("a turn");
        let _fast_kept = limits.try_acquire(&fast).expect("a turn");
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(quick);
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(held);
        assert_eq!(limits.limit(&fast), Some(32));
        assert_eq!(limits.limit(&slow), Some(3));
        // At its lowered limit (3), a slow endpoint's next job is deferred.
        let more: Vec<_> = (0..2).map(|_| limits.try_acquire(&slow)).collect();
        assert!(limits.acquire_if_moving(&slow).await.is_none());
        drop(more);
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
