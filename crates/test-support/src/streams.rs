//! What a stream holds, read back for a measurement.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use futures::StreamExt;

/// Every message of `stream` on `subject` (a filter), in order, each with
/// when the stream stored it (unix nanoseconds), read by an ordered
/// consumer; an error when one cannot be read within 5 s.
pub async fn stored(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> Result<Vec<(bytes::Bytes, i128)>, async_nats::Error> {
    let stream = js.get_stream(stream).await?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: subject.into(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let pending = consumer.cached_info().num_pending as usize;
    let mut out = Vec::with_capacity(pending);
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await?;
    while out.len() < pending {
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await?
            .ok_or("the stream's messages ended")??;
        let stored = message.info()?.published;
        out.push((message.payload.clone(), stored.unix_timestamp_nanos()));
    }
    Ok(out)
}
