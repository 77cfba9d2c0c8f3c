//! Limits of a webhook definition that the admin API checks and the
//! deliverer enforces: one place, one type.

/// A webhook's timeout when it sets none.
pub const DEFAULT_TIMEOUT_MS: u32 = 5_000;
/// The longest timeout a webhook may set.
pub const MAX_TIMEOUT_MS: u32 = 30_000;

/// The timeout a delivery uses for a webhook's `timeout_ms` (0: unset).
pub fn timeout_ms(configured: u32) -> u32 {
    match configured {
        0 => DEFAULT_TIMEOUT_MS,
        ms => ms.min(MAX_TIMEOUT_MS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts() {
        for (configured, used) in [
            (0, 5_000),
            (1, 1),
            (1_500, 1_500),
            (30_000, 30_000),
            (90_000, 30_000),
        ] {
            assert_eq!(timeout_ms(configured), used, "{configured}");
        }
    }
}
