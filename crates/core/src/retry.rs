//! Retry schedules: the delays between attempts, with jitter.

use std::time::Duration;

use crate::duration::{DurationError, parse_duration};

/// Delays between attempts: `delays[0]` separates attempt 1 from attempt 2.
/// A delivery makes at most `delays.len() + 1` attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule {
    delays: Vec<Duration>,
}

impl Default for RetrySchedule {
    /// 5 s, 1 min, 10 min, 1 h, 4 h, 12 h, 24 h: eight attempts over ~41 h.
    fn default() -> Self {
        Self::parse("5s,1m,10m,1h,4h,12h,24h").expect("default schedule parses")
    }
}

impl RetrySchedule {
    pub fn new(delays: Vec<Duration>) -> Self {
        Self { delays }
    }

    /// Parses `5s,1m,10m`; an empty string means no retries.
    pub fn parse(text: &str) -> Result<Self, DurationError> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Self { delays: Vec::new() });
        }
        let delays = text
            .split(',')
            .map(parse_duration)
            .collect::<Result<_, _>>()?;
        Ok(Self { delays })
    }

    /// The whole schedule, first attempt to last, without jitter: a
    /// delivery's deadline after its first attempt.
    pub fn span(&self) -> Duration {
        self.delays.iter().sum()
    }

    pub fn max_attempts(&self) -> u32 {
        self.delays.len() as u32 + 1
    }

    /// The delay before the attempt after `attempt` (1-based), or `None` when
    /// the schedule has run out. `jitter` in `[0, 1)` spreads retries of many
    /// deliveries that failed together over +0–20% of the delay.
    pub fn delay_after(&self, attempt: u32, jitter: f64) -> Option<Duration> {
        let base = *self.delays.get(attempt.checked_sub(1)? as usize)?;
        Some(base.mul_f64(1.0 + 0.2 * jitter.clamp(0.0, 1.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule() {
        let s = RetrySchedule::default();
        assert_eq!(s.max_attempts(), 8);
        assert_eq!(s.delay_after(1, 0.0), Some(Duration::from_secs(5)));
        assert_eq!(s.delay_after(1, 1.0), Some(Duration::from_secs(6)));
        assert_eq!(s.delay_after(7, 0.0), Some(Duration::from_secs(86_400)));
        assert_eq!(s.delay_after(8, 0.0), None);
        assert_eq!(s.delay_after(0, 0.0), None);
        assert_eq!(RetrySchedule::parse("").unwrap().max_attempts(), 1);
        assert_eq!(
            RetrySchedule::parse("100ms,200ms")
                .unwrap()
                .delay_after(2, 0.5),
            Some(Duration::from_millis(220))
        );
        assert!(RetrySchedule::parse("5s,,1m").is_err());
    }
}
