//! Matcher: fans each accepted event out to the organization's webhooks.
//!
//! It consumes `herald.accepted.<org>`, finds the webhooks whose event types
//! and filters select the event, and publishes one `herald.v1.DeliveryJob`
//! per match to `herald.deliveries.<org>.<webhook>`. The event is acked only
//! after every job is durably stored; a crash in between re-matches it, and
//! because delivery ids are derived from (org, event, webhook) and jobs carry
//! `Nats-Msg-Id: <delivery id>.1`, the receiver still sees one delivery.
//! On shutdown it finishes the events in hand and hands back at once those
//! pulled but not started. Where the subscription sets come from, and how
//! a webhook change reaches them, is in [`Cache`].

mod subscriptions;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use herald_core::{ids, names, ordering as order_rules, proto};
use herald_platform::config::{self, ConfigError, Source};
use herald_platform::lanes::{self, Downstream, Lanes};
use herald_platform::ordering::{self, OrderingError, Queues};
use herald_platform::redis::Redis;
use herald_platform::webhooks::WebhookStore;
use herald_platform::worker::{self, Disposition, Handler, InOrder, Worker};
use herald_platform::{dead_letters, nats, trace};
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio_util::sync::CancellationToken;

pub use subscriptions::{Cache, CacheMetrics};

pub const HEALTH_ADDR: &str = "HERALD_MATCHER_HEALTH_ADDR";
pub const CACHE_TTL: &str = "HERALD_SUBSCRIPTION_CACHE_TTL";
/// How long an event may stay unacknowledged before NATS hands it to another
/// matcher (after a crash between publishing its jobs and acking it).
pub const ACK_WAIT: &str = "HERALD_MATCHER_ACK_WAIT";

/// Accepted events asked for at a time.
const PULL_BATCH: usize = 500;
/// Delivery jobs one fan-out has published and not yet seen acknowledged.
const ACK_WINDOW: usize = 128;

#[derive(Debug, Clone)]
pub struct Config {
    pub nats: config::Nats,
    pub redis_url: String,
    pub health_addr: config::Listen,
    /// How long Redis keeps an organization's subscription set.
    pub cache_ttl: Duration,
    pub ack_wait: Duration,
    pub concurrency: usize,
    /// Whether a bursting organization's events are matched beside the
    /// others', paced by its deliveries (`platform::lanes`).
    pub lanes: bool,
}

impl Config {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        Ok(Self {
            nats: config::Nats::from_source(src)?,
            redis_url: config::redis_url(src)?,
            health_addr: config::listen(src, HEALTH_ADDR, "127.0.0.1:9102")?,
            cache_ttl: config::duration(src, CACHE_TTL, Duration::from_secs(60))?,
            ack_wait: config::duration(src, ACK_WAIT, Duration::from_secs(30))?,
            concurrency: 128,
            lanes: config::boolean(src, lanes::LANES, true)?,
        })
    }
}

/// Why the service stopped.
pub use herald_platform::service::WorkerError as Error;

/// Why an event could not be fanned out; every case is Herald's own, so
/// the event is handed back, or set aside when it can never succeed.
#[derive(Debug, thiserror::Error)]
pub enum FanOutError {
    #[error("cannot read the organization's webhooks: {0}")]
    Subscriptions(#[from] herald_platform::webhooks::StoreError),
    #[error(transparent)]
    Publish(#[from] nats::PublishError),
    #[error(transparent)]
    Ordering(#[from] OrderingError),
}

impl FanOutError {
    fn is_permanent(&self) -> bool {
        match self {
            FanOutError::Publish(e) => e.is_permanent(),
            FanOutError::Ordering(e) => e.is_permanent(),
            FanOutError::Subscriptions(_) => false,
        }
    }
}

#[derive(Clone)]
struct Metrics {
    events: Counter,
    jobs: Counter,
    unmatched: Counter,
    dead_letters: Counter,
}

struct State {
    js: jetstream::Context,
    cache: Cache,
    metrics: Metrics,
    /// Ordered webhooks' queues: their deliveries wait there for their
    /// key's turn.
    queues: Queues,
    /// Appends to those queues go in the order events were pulled.
    order: InOrder,
    /// With lanes: told of each event's fan-out, so that a flood opens its
    /// organization's lane at once.
    downstream: Option<Downstream>,
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let (health, client) = herald_platform::service::start_worker(
        "matcher",
        &config.health_addr,
        &config.nats,
        &shutdown,
    )
    .await?;
    let metrics = Metrics {
        events: health.counter("events_matched", "Events matched against subscriptions"),
        jobs: health.counter("delivery_jobs", "Delivery jobs published (fan-out)"),
        unmatched: health.counter("events_unmatched", "Events that matched no webhook"),
        dead_letters: health.counter(
            "dead_letters",
            "Accepted events moved to HERALD_DEAD because Herald cannot process them",
        ),
    };

    // Each fan-out keeps at most ACK_WINDOW publishes unacknowledged, so
    // room for all of them at once means no fan-out ever waits for room
    // held by another (which could stall them all).
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(config.concurrency * ACK_WINDOW)
        .timeout(nats::REQUEST_TIMEOUT)
        .build(client.clone());
    nats::ensure_streams(&js, config.nats.replicas, &config.nats.streams, &shutdown).await?;
    let store = nats::retry(&shutdown, || WebhookStore::open(&js, config.nats.replicas)).await?;
    let redis = Redis::new(&config.redis_url, Duration::from_millis(250))?;
    health.watch_redis_degradable(redis.clone(), shutdown.clone());
    let cache = Cache::new(
        store.clone(),
        redis,
        config.cache_ttl,
        CacheMetrics::registered(&health),
    );

    // The change feed first catches up on recent changes, so no set cached
    // before a change made while no matcher ran is used.
    let (ready, caught_up) = tokio::sync::oneshot::channel();
    tokio::spawn(subscriptions::follow_changes(
        store,
        cache.clone(),
        config.cache_ttl + Duration::from_secs(30),
        ready,
        shutdown.clone(),
    ));
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        _ = caught_up => {}
    }

    let spec = worker::Spec {
        stream: names::ACCEPTED_STREAM,
        durable: names::MATCHER_CONSUMER,
        filter: "",
        ack_wait: config.ack_wait,
        max_ack_pending: 10_000,
        batch: PULL_BATCH,
        max_bytes: 0,
        max_deliveries: dead_letters::MAX_HAND_BACKS,
        // A fan-out to thousands of webhooks tells the server it is still
        // working on its event, so it is never redelivered and done twice
        // meanwhile.
        progress_every: Some(config.ack_wait / 3),
        operation: "match",
        gather: herald_core::gather::Gather::OFF,
    };
    let dead = metrics.dead_letters.clone();
    let worker = Worker::start(&js, &health, spec, Some(dead), &shutdown).await?;
    let downstream = config.lanes.then(|| Downstream::deliveries(&js, &shutdown));
    let state = Arc::new(State {
        js: js.clone(),
        cache,
        metrics,
        queues: Queues::new(js.clone(), ordering::KEY_TTL),
        order: InOrder::default(),
        downstream: downstream.clone(),
    });
    if let Some(downstream) = downstream {
        let lanes = Lanes::start(
            &js,
            config.nats.replicas,
            lanes::MATCHER,
            Some(downstream),
            &health,
            &shutdown,
        )
        .await?;
        lanes
            .each(worker, state, config.concurrency, &shutdown)
            .await;
    } else {
        worker.each(state, config.concurrency, &shutdown).await;
    }
    Ok(())
}

impl Handler for State {
    fn in_order(&self) -> Option<&InOrder> {
        Some(&self.order)
    }

    async fn handle(&self, message: &jetstream::Message) -> Disposition {
        // The event's place in HERALD_ACCEPTED: jobs carry it so that retry,
        // recover and replay read the event back instead of copying it.
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let event = match proto::Event::decode(message.payload.clone()) {
            Ok(event) => event,
            Err(error) => {
                tracing::error!(%error, subject = %message.subject, "undecodable accepted event");
                return Disposition::DeadLetter(format!("undecodable accepted event: {error}"));
            }
        };
        let at = worker::Position::of(message);
        match self.fan_out(&event, seq, at.as_ref()).await {
            Ok(()) => {
                self.metrics.events.inc();
                Disposition::Ack
            }
            Err(error) if error.is_permanent() => {
                tracing::error!(%error, event_id = %event.id, "a delivery job can never be published");
                Disposition::DeadLetter(format!("fan-out: {error}"))
            }
            Err(error) => {
                tracing::warn!(%error, event_id = %event.id, org = %event.organization_id, "fan-out failed, event handed back");
                Disposition::HandBack(Duration::from_secs(1))
            }
        }
    }
}

impl State {
    /// `at`: the event's place in its consumer, for the order of the
    /// appends to ordered webhooks' queues.
    async fn fan_out(
        &self,
        event: &proto::Event,
        event_seq: u64,
        at: Option<&worker::Position>,
    ) -> Result<(), FanOutError> {
        let set = self.cache.get(&event.organization_id).await?;
        let mut matches = set.matching(&event.r#type, &event.attributes);
        // A webhook is never sent system events about itself.
        if herald_core::catalogue::is_system(&event.r#type)
            && let Some(about) = event.attributes.get("webhook")
        {
            matches.retain(|s| &s.webhook_id != about);
        }
        if let Some(downstream) = &self.downstream {
            downstream.matched(&event.organization_id, matches.len() as u64);
        }
        if matches.is_empty() {
            if let Some(at) = at {
                self.order.pass(at);
            }
            self.metrics.unmatched.inc();
            return Ok(());
        }
        // The event is encoded once and appended to each job as its field 4
        // (protobuf fields may come in any order), so a large event is not
        // copied and re-encoded per webhook.
        let mut event_field = Vec::with_capacity(event.encoded_len() + 8);
        prost::encoding::message::encode(4, event, &mut event_field);
        let n = matches.len() as u64;
        let (mut ordered, mut unordered) = (Vec::new(), Vec::with_capacity(matches.len()));
        for subscription in matches {
            let key = order_rules::key_of(subscription.ordering.as_ref(), &event.attributes);
            let job = proto::DeliveryJob {
                delivery_id: ids::delivery_id(
                    &event.organization_id,
                    &event.id,
                    &subscription.webhook_id,
                ),
                organization_id: event.organization_id.clone(),
                webhook_id: subscription.webhook_id.clone(),
                event: None,
                attempt: 1,
                kind: proto::DeliveryKind::Event as i32,
                event_seq,
                ordered: key.map(|key| proto::OrderedPlace {
                    key: key.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let mut payload = Vec::with_capacity(job.encoded_len() + event_field.len());
            job.encode(&mut payload)
                .expect("encoding into a Vec cannot fail");
            payload.extend_from_slice(&event_field);
            let msg_id = ids::first_job_msg_id(&job.delivery_id);
            if key.is_some() {
                ordered.push((job, payload, msg_id));
            } else {
                unordered.push((job, payload, msg_id));
            }
        }
        // An ordered webhook's delivery waits for its key's turn, appended
        // to its key's queue in the order the events were pulled (each
        // waits for the events pulled before it to be appended, or to have
        // nothing to append), and handed on once its key had nothing
        // waiting before it (`platform::ordering`).
        let mut appended = Vec::with_capacity(ordered.len());
        if !ordered.is_empty()
            && let Some(at) = at
        {
            self.order.turn(at).await;
        }
        for (job, payload, msg_id) in ordered {
            let ack = self.queues.append(&job, payload.into(), &msg_id).await?;
            appended.push((job, ack));
        }
        if let Some(at) = at {
            self.order.pass(at);
        }
        // Each ack future carries its subject, for the error.
        let mut acks = FuturesUnordered::new();
        let acked = |(subject, result): (String, Result<_, jetstream::context::PublishError>)| {
            result
                .map(|_| ())
                .map_err(|source| nats::PublishError::Publish { subject, source })
        };
        for (job, payload, msg_id) in unordered {
            if acks.len() >= ACK_WINDOW
                && let Some(result) = acks.next().await
            {
                acked(result)?;
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(names::MSG_ID_HEADER, msg_id.as_str());
            trace::inject(&mut headers, &event.traceparent);
            let subject = names::delivery_subject(&event.organization_id, &job.webhook_id);
            let ack = match self
                .js
                .publish_with_headers(subject.clone(), headers, payload.into())
                .await
            {
                Ok(ack) => ack,
                Err(source) => return Err(nats::PublishError::Publish { subject, source }.into()),
            };
            acks.push(async move { (subject, ack.await) });
        }
        while let Some(result) = acks.next().await {
            acked(result)?;
        }
        for (job, ack) in appended {
            ack.await?;
            self.queues.hand_on_job(&job).await?;
        }
        self.metrics.jobs.inc_by(n);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job built by appending the encoded event decodes to the job with
    /// the event inside.
    #[test]
    fn jobs_carry_the_event_encoded_once() {
        let event = proto::Event {
            id: "evt_1".into(),
            organization_id: "acme".into(),
            r#type: "workflow.completed".into(),
            data_json: br#"{"big":"data"}"#.to_vec().into(),
            ..Default::default()
        };
        let job = proto::DeliveryJob {
            delivery_id: "msg_1".into(),
            webhook_id: "wh_1".into(),
            attempt: 1,
            ..Default::default()
        };
        let mut payload = job.encode_to_vec();
        prost::encoding::message::encode(4, &event, &mut payload);
        let decoded = proto::DeliveryJob::decode(payload.as_slice()).unwrap();
        assert_eq!(
            decoded,
            proto::DeliveryJob {
                event: Some(event),
                ..job
            }
        );
    }
}
