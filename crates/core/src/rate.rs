//! Token buckets: how often a caller may do something costly (send a test
//! event, retry an attempt by hand), as a pure function of the bucket and
//! the time.

/// One token, in the bucket's units: a rate of `per_minute` adds
/// `per_minute` units a millisecond, so the arithmetic is exact.
const UNIT: i64 = 60_000;

/// A bucket's fill at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    units: i64,
    at_ms: i64,
}

/// The limit a bucket keeps: at most `burst` at once, refilled at
/// `per_minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

impl Rate {
    /// A full bucket, as a caller not seen before has.
    pub fn full(&self, now_ms: i64) -> Bucket {
        Bucket {
            units: self.capacity(),
            at_ms: now_ms,
        }
    }

    fn capacity(&self) -> i64 {
        i64::from(self.burst) * UNIT
    }

    fn fill(&self, bucket: Bucket, now_ms: i64) -> i64 {
        let elapsed = (now_ms - bucket.at_ms).max(0);
        bucket
            .units
            .saturating_add(elapsed.saturating_mul(i64::from(self.per_minute)))
            .min(self.capacity())
    }

    /// Takes one token from `bucket` at `now_ms`: `Ok` with the bucket after,
    /// or `Err` with the milliseconds until a token is there.
    pub fn take(&self, bucket: Bucket, now_ms: i64) -> Result<Bucket, u64> {
        let units = self.fill(bucket, now_ms);
        if units >= UNIT {
            return Ok(Bucket {
                units: units - UNIT,
                at_ms: now_ms.max(bucket.at_ms),
            });
        }
        if self.per_minute == 0 {
            return Err(u64::MAX);
        }
        let missing = UNIT - units;
        let per = i64::from(self.per_minute);
        Err(((missing + per - 1) / per) as u64)
    }

    /// Whether `bucket` is full again by `now_ms` (and can be forgotten).
    pub fn refilled(&self, bucket: &Bucket, now_ms: i64) -> bool {
        self.fill(*bucket, now_ms) >= self.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_a_burst_then_refills_at_the_rate() {
        let rate = Rate {
            per_minute: 60,
            burst: 3,
        };
        let mut bucket = rate.full(0);
        // (time, allowed, or the wait answered)
        let steps: &[(i64, Result<(), u64>)] = &[
            (0, Ok(())),
            (0, Ok(())),
            (0, Ok(())),
            (0, Err(1000)),
            (400, Err(600)),
            (1000, Ok(())),
            (1000, Err(1000)),
            (2500, Ok(())),
            (2600, Err(400)),
            // Long idle: back to the burst, not beyond.
            (60_000, Ok(())),
            (60_000, Ok(())),
            (60_000, Ok(())),
            (60_000, Err(1000)),
        ];
        for (i, (now, expected)) in steps.iter().enumerate() {
            match (rate.take(bucket, *now), expected) {
                (Ok(after), Ok(())) => bucket = after,
                (Err(wait), Err(want)) => assert_eq!(wait, *want, "step {i}"),
                (got, want) => panic!("step {i}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_clock_going_back_grants_nothing() {
        let rate = Rate {
            per_minute: 60,
            burst: 1,
        };
        let bucket = rate.take(rate.full(10_000), 10_000).unwrap();
        assert!(rate.take(bucket, 5_000).is_err());
    }

    #[test]
    fn knows_when_a_bucket_is_full_again() {
        let rate = Rate {
            per_minute: 60,
            burst: 2,
        };
        let bucket = rate.take(rate.full(0), 0).unwrap();
        assert!(!rate.refilled(&bucket, 500));
        assert!(rate.refilled(&bucket, 1000));
    }
}
