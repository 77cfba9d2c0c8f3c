//! How a webhook's endpoint state (`core::policy::Endpoint`) is stored in
//! Redis, under `names::endpoint_key`: JSON, with healthy as no value at
//! all (a healthy webhook costs no key). The deliverer writes it; admin
//! reads it to show a webhook's state and deletes it on re-enable.

use herald_core::policy::Endpoint;

/// The stored form of `state`; empty for healthy (the key is deleted).
pub fn encode(state: &Endpoint) -> String {
    match state {
        Endpoint::Healthy => String::new(),
        other => serde_json::to_string(other).expect("endpoint state encodes"),
    }
}

/// The state stored as `text`: healthy when empty, and when unreadable
/// (the safe side: losing a state makes a webhook healthy again).
pub fn decode(text: &str) -> Endpoint {
    if text.is_empty() {
        return Endpoint::Healthy;
    }
    serde_json::from_str(text).unwrap_or_else(|error| {
        tracing::warn!(%error, "unreadable endpoint state, taken as healthy");
        Endpoint::Healthy
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_is_no_value_and_the_rest_round_trips() {
        assert_eq!(encode(&Endpoint::Healthy), "");
        assert_eq!(decode(""), Endpoint::Healthy);
        assert_eq!(decode("not json"), Endpoint::Healthy);
        let throttled = Endpoint::Throttled {
            until_ms: 1_000,
            throttles: 2,
        };
        assert_eq!(decode(&encode(&throttled)), throttled);
    }
}
