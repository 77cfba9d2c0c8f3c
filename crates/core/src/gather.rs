//! Gathering: at a moderate rate, the first stage starts the events that
//! arrive close together as one batch, so every stage after it wakes once
//! for several deliveries instead of once for each.
//!
//! Why: a delivery crosses four JetStream hops, and at 1,000 deliveries/s
//! each message finds every process asleep — a wake-up of nats-server and
//! of the services at both ends for every message, about four times the
//! CPU a delivery costs at full speed (docs/benchmarks.md, "The cost of a
//! delivery at every load"). Events started together are published
//! together, stored together and pulled together downstream, so the
//! wake-ups are shared.
//!
//! The cost is latency: an event waits at most [`Gather::max`] for others.
//! It waits only when the events have been arriving at least two to a
//! window (slower, there would be nothing to gather, and the wait would buy
//! nothing), and a batch of [`Gather::enough`] starts at once (faster, the
//! window shrinks with the rate). Rules only; the clock is the caller's.

use std::time::Duration;

/// How a stage gathers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gather {
    /// The longest an event waits for others (zero: never gathers).
    pub max: Duration,
    /// A batch this big starts at once.
    pub enough: usize,
}

/// How far apart the events have been arriving, smoothed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Arrivals {
    /// The mean gap, in microseconds (weighted toward the recent ones).
    gap_us: f64,
    last_us: Option<u64>,
}

/// A gap longer than this counts as this: an idle minute weighs no more
/// than an idle second, so gathering resumes soon after a pause.
const LONGEST_GAP_US: u64 = 1_000_000;

/// How much each new gap weighs in the mean.
const WEIGHT: f64 = 1.0 / 8.0;

impl Arrivals {
    /// An event arrived at `now_us` (any clock that does not go back).
    pub fn arrived(&mut self, now_us: u64) {
        self.gap_us = match self.last_us {
            Some(last) => {
                let gap = now_us.saturating_sub(last).min(LONGEST_GAP_US);
                self.gap_us + (gap as f64 - self.gap_us) * WEIGHT
            }
            None => LONGEST_GAP_US as f64,
        };
        self.last_us = Some(now_us);
    }

    /// The smoothed gap between events.
    pub fn gap(&self) -> Duration {
        Duration::from_micros(self.gap_us as u64)
    }
}

impl Gather {
    /// Never gathers.
    pub const OFF: Gather = Gather {
        max: Duration::ZERO,
        enough: 1,
    };

    /// Whether an event arriving with nothing gathered waits for others:
    /// only when at least two are expected within `max`.
    pub fn waits(&self, arrivals: &Arrivals) -> bool {
        !self.max.is_zero() && self.enough > 1 && arrivals.gap() * 2 <= self.max
    }

    /// Whether `gathered` events start now, without waiting out the window.
    pub fn full(&self, gathered: usize) -> bool {
        gathered >= self.enough
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Gather = Gather {
        max: Duration::from_millis(5),
        enough: 8,
    };

    /// Arrivals `every_us` apart, `n` of them, after a first at 0.
    fn steady(every_us: u64, n: u64) -> Arrivals {
        let mut a = Arrivals::default();
        for i in 0..=n {
            a.arrived(i * every_us);
        }
        a
    }

    #[test]
    fn whether_an_event_waits_follows_the_rate() {
        // (gap between events µs, how many came, waits)
        let cases = [
            (1_000, 100, true),   // 1,000/s: five to a window
            (250, 100, true),     // 4,000/s
            (2_400, 100, true),   // 417/s: two to a window, just
            (3_000, 100, false),  // 333/s: fewer than two
            (10_000, 100, false), // 100/s
            (1_000, 5, false),    // the first events after a pause: not yet
            (1_000, 60, true),    // ... but within tens of milliseconds
        ];
        for (every, n, waits) in cases {
            assert_eq!(
                G.waits(&steady(every, n)),
                waits,
                "every {every} µs, {n} events"
            );
        }
    }

    #[test]
    fn the_first_event_ever_and_one_after_a_pause_go_at_once() {
        let mut a = Arrivals::default();
        a.arrived(0);
        assert!(!G.waits(&a));
        let mut a = steady(1_000, 200);
        assert!(G.waits(&a));
        a.arrived(200_000 + 60_000_000);
        assert!(!G.waits(&a), "a minute's pause");
    }

    #[test]
    fn off_never_waits_and_a_full_batch_starts() {
        let busy = steady(100, 1_000);
        assert!(!Gather::OFF.waits(&busy));
        let one = Gather {
            max: Duration::from_millis(5),
            enough: 1,
        };
        assert!(!one.waits(&busy), "a batch of one is no batch");
        assert!(!G.full(7));
        assert!(G.full(8));
        assert!(G.full(9));
    }

    #[test]
    fn a_clock_that_stands_still_counts_no_gap() {
        let mut a = steady(1_000, 100);
        for _ in 0..100 {
            a.arrived(100_000);
        }
        assert_eq!(a.gap(), Duration::ZERO);
    }
}
