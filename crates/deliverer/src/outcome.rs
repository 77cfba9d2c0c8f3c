//! How one attempt ended, decided from the response or the error: success,
//! failure, whether the endpoint is to blame, whether it is gone for good,
//! and how long it asked Herald to wait.

use std::time::{Duration, SystemTime};

use herald_core::proto;

use crate::http::{Response, SendError};

/// The longest `Retry-After` honoured; a longer ask waits this long (the
/// policy's cap on a throttle pause, `core::policy::MAX_THROTTLE_MS`).
pub const MAX_RETRY_AFTER: Duration =
    Duration::from_millis(herald_core::policy::MAX_THROTTLE_MS as u64);

/// How one attempt ended.
#[derive(Debug)]
pub struct Outcome {
    pub status: proto::AttemptStatus,
    pub response: Option<Response>,
    pub error: String,
    /// The endpoint's fault: opens the circuit breaker.
    pub endpoint_failure: bool,
    /// The endpoint asked to slow down (429, or 503 with `Retry-After`):
    /// not a failure of the endpoint, and no attempt spent.
    pub throttled: bool,
    /// 410 Gone: disable now.
    pub gone: bool,
    /// A `Retry-After` the endpoint asked for (429 and 503 only).
    pub retry_after: Option<Duration>,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        self.status == proto::AttemptStatus::Succeeded
    }

    /// A failure without a response, the endpoint's fault.
    pub fn endpoint(error: String) -> Self {
        Self::failed(error, true)
    }

    /// A failure of Herald's own: nothing about the endpoint is learnt.
    pub fn herald(error: String) -> Self {
        Self::failed(error, false)
    }

    fn failed(error: String, endpoint_failure: bool) -> Self {
        Self {
            status: proto::AttemptStatus::Failed,
            response: None,
            error,
            endpoint_failure,
            throttled: false,
            gone: false,
            retry_after: None,
        }
    }
}

/// Classifies what `send` answered, `now` being when it answered.
pub fn classify(result: Result<Response, SendError>, now: SystemTime) -> Outcome {
    let response = match result {
        Ok(response) => response,
        Err(error) => return Outcome::failed(error.to_string(), error.endpoint_failure()),
    };
    let status = response.status;
    let ok = (200..300).contains(&status);
    let retry_after = if status == 429 || status == 503 {
        response
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("retry-after"))
            .and_then(|(_, v)| parse_retry_after(v, now))
    } else {
        None
    };
    let throttled = status == 429 || (status == 503 && retry_after.is_some());
    Outcome {
        status: if ok {
            proto::AttemptStatus::Succeeded
        } else {
            proto::AttemptStatus::Failed
        },
        error: match status {
            200..=299 => String::new(),
            300..=399 => format!("HTTP {status}: redirects are not followed"),
            410 => "HTTP 410 Gone: the endpoint asked to stop deliveries".into(),
            _ if throttled => format!("HTTP {status}: throttled; the webhook is paused"),
            _ => format!("HTTP {status}"),
        },
        response: Some(response),
        endpoint_failure: !ok && !throttled,
        throttled,
        gone: status == 410,
        retry_after,
    }
}

/// Parses `Retry-After`: delay seconds or an HTTP date, at most
/// [`MAX_RETRY_AFTER`]. A date in the past means no wait.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits to fit still means "a long time".
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(unix: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix)
    }

    #[test]
    fn retry_after_forms() {
        // Sun, 06 Nov 1994 08:49:37 GMT
        let now = at(784_111_777);
        for (value, expected) in [
            ("120", Some(120)),
            (" 5 ", Some(5)),
            ("0", Some(0)),
            ("99999999999999999999999", Some(3_600)),
            ("3601", Some(3_600)),
            ("Sun, 06 Nov 1994 08:50:37 GMT", Some(60)),
            ("Sunday, 06-Nov-94 08:51:37 GMT", Some(120)),
            ("Sun Nov  6 08:49:47 1994", Some(10)),
            ("Sun, 06 Nov 1994 08:00:00 GMT", Some(0)),
            ("Sun, 06 Nov 1994 09:49:37 GMT", Some(3_600)),
            ("Mon, 07 Nov 1994 08:49:37 GMT", Some(3_600)),
            ("-5", None),
            ("1.5", None),
            ("soon", None),
            ("", None),
        ] {
            assert_eq!(
                parse_retry_after(value, now),
                expected.map(Duration::from_secs),
                "{value:?}"
            );
        }
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> Result<Response, SendError> {
        Ok(Response {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: bytes::Bytes::new(),
            truncated: false,
        })
    }

    /// (result, succeeded, endpoint's fault, gone, retry-after seconds)
    fn check(result: Result<Response, SendError>, expected: (bool, bool, bool, Option<u64>)) {
        let what = format!("{result:?}");
        let o = classify(result, at(1_000_000));
        assert_eq!(
            (
                o.succeeded(),
                o.endpoint_failure,
                o.gone,
                o.retry_after.map(|d| d.as_secs())
            ),
            expected,
            "{what}"
        );
        assert_eq!(o.succeeded(), o.error.is_empty(), "{what}: {}", o.error);
    }

    #[test]
    fn classification() {
        check(response(200, &[]), (true, false, false, None));
        check(response(204, &[]), (true, false, false, None));
        check(response(299, &[]), (true, false, false, None));
        check(
            response(302, &[("location", "http://x/")]),
            (false, true, false, None),
        );
        check(response(304, &[]), (false, true, false, None));
        check(response(400, &[]), (false, true, false, None));
        check(response(410, &[]), (false, true, true, None));
        // Throttling is not the endpoint's failure.
        check(
            response(429, &[("Retry-After", "30")]),
            (false, false, false, Some(30)),
        );
        check(response(429, &[]), (false, false, false, None));
        check(
            response(503, &[("retry-after", "Mon, 12 Jan 1970 13:46:50 GMT")]),
            (false, false, false, Some(10)),
        );
        // A 503 that names no time is a failure.
        check(response(503, &[]), (false, true, false, None));
        // Only 429 and 503 are asking to wait.
        check(
            response(500, &[("retry-after", "30")]),
            (false, true, false, None),
        );
        check(
            Err(SendError::Timeout(Duration::from_secs(5))),
            (false, true, false, None),
        );
        check(
            Err(SendError::Connect("refused".into())),
            (false, true, false, None),
        );
        check(
            Err(SendError::Refused("loopback".into())),
            (false, true, false, None),
        );
        check(
            Err(SendError::NotFound("nxdomain".into())),
            (false, true, false, None),
        );
        // Herald's own resolver failing is not the endpoint's fault…
        check(
            Err(SendError::Resolver("servfail".into())),
            (false, false, false, None),
        );
        // …nor is Herald's own network (no route, no source address).
        check(
            Err(SendError::Network("network is unreachable".into())),
            (false, false, false, None),
        );
        assert!(
            classify(response(302, &[]), at(0))
                .error
                .contains("redirects are not followed")
        );
    }
}
