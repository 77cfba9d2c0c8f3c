//! One job's way through the deliverer: ask the policy what to do with it,
//! send it, ask the policy what follows, and carry that out (publish the
//! attempt, park, wait, disable, announce). The decisions are all
//! `core::policy`'s; this module only does what they say.
//!
//! Herald's own trouble (its resolver, a secret it cannot decrypt, NATS,
//! the webhook store) ends a job in [`Done::HandBack`]: it is not the
//! receiver's attempt, so nothing is logged for it; the job is put back as
//! a message schedule after a wait that backs off
//! (`Policy::on_own_failure`), and goes to the dead letters once the trouble
//! has lasted `HERALD_OWN_FAILURE_GIVE_UP`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream;
use bytes::Bytes;
use herald_core::ordering::Conclusion;
use herald_core::payload::{self, Format};
use herald_core::policy::{
    self, Action, Arrival, Attempted, Class, DisableReason, Endpoint, FailureReason, Notice,
    ProbeTimer,
};
use herald_core::signing::{self, SigningKey};
use herald_core::{catalogue, ids, masking, names, proto};
use herald_platform::nats::PublishError;
use herald_platform::ordering::OrderingError;
use herald_platform::webhooks::StoreError;
use herald_platform::worker::Disposition;
use herald_platform::{now_ms, trace};
use prost::Message;

use crate::State;
use crate::endpoint_state::Source;
use crate::outbox::SystemEvent;
use crate::outcome::{self, Outcome};
use crate::parking::ParkingError;

/// How soon a probe timer fires again after a release or a drain failed.
const REARM_AFTER_ERROR: Duration = Duration::from_secs(5);
/// At most one warning per this long about Herald's own failures (an outage
/// stops every job at once); the metric counts each.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What becomes of the job in hand.
pub enum Done {
    /// Finished (sent, parked, waiting, skipped): ack it.
    Ack,
    /// Herald's own trouble (its resolver, a secret, NATS, the webhook
    /// store), with nothing of it sent to the receiver or the send to be
    /// made again: the job waits, backing off, and is tried again as it is
    /// (or, when the trouble is permanent, goes to the dead letters).
    HandBack(JobError),
}

/// Herald's own trouble that stopped a job: not the receiver's doing, so
/// nothing is logged as its attempt. Transient trouble is waited out
/// (`Policy::on_own_failure`); a permanent one (a message NATS will never
/// take) goes to the dead letters at once, since trying again cannot help.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Parking(#[from] ParkingError),
    #[error(transparent)]
    Ordering(#[from] OrderingError),
    #[error("cannot publish {kind}: {source}")]
    SystemEvent {
        kind: &'static str,
        source: PublishError,
    },
    /// The endpoint state kept changing under compare-and-set while a probe
    /// was being claimed: nothing was sent.
    #[error("endpoint state kept changing")]
    Contended,
    /// The grace period ended with the job in hand.
    #[error("shutting down")]
    ShuttingDown,
    /// The attempt could not be made for Herald's own reason (its resolver,
    /// a secret or header it cannot decrypt, its own network): the
    /// classified outcome's error.
    #[error("{0}")]
    Attempt(String),
}

impl JobError {
    /// Trying the same job again can never succeed.
    pub fn is_permanent(&self) -> bool {
        match self {
            JobError::Publish(e) | JobError::SystemEvent { source: e, .. } => e.is_permanent(),
            JobError::Parking(ParkingError::Publish(e)) => e.is_permanent(),
            JobError::Ordering(e) => e.is_permanent(),
            _ => false,
        }
    }
}

/// Rate-limited warnings: the first at once, then at most one per
/// [`WARN_EVERY`], saying how many were held back meanwhile.
#[derive(Default)]
pub struct Warnings {
    last: Mutex<Option<Instant>>,
    held: AtomicU64,
}

impl Warnings {
    /// `Some(n)` when this one is to be logged, `n` being how many were
    /// not since the last.
    fn take(&self) -> Option<u64> {
        let mut last = self.last.lock().expect("warnings");
        if last.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(Instant::now());
        Some(self.held.swap(0, Ordering::Relaxed))
    }
}

/// The job as it goes on after Herald's own trouble ended for it: the next
/// trouble starts a new count.
fn got_on(job: &proto::DeliveryJob) -> proto::DeliveryJob {
    proto::DeliveryJob {
        own_failures: 0,
        own_failure_since_ms: 0,
        ..job.clone()
    }
}

fn finish<E: Into<JobError>>(result: Result<(), E>) -> Done {
    match result {
        Ok(()) => Done::Ack,
        Err(error) => Done::HandBack(error.into()),
    }
}

impl State {
    /// Carries `message`'s job through and says what becomes of the
    /// message (the worker loop settles it). A job still in hand when the
    /// grace period after shutdown ends is handed back at once: another
    /// replica (or this one, restarted) makes the attempt.
    pub(crate) async fn handle(self: &Arc<Self>, message: &jetstream::Message) -> Disposition {
        let info = message.info().ok();
        let source = info.as_ref().map_or(0, |i| i.stream_sequence);
        let job = match proto::DeliveryJob::decode(message.payload.clone()) {
            Ok(job) => job,
            Err(error) => {
                tracing::error!(%error, subject = %message.subject, "undecodable delivery job");
                return Disposition::DeadLetter(format!("undecodable delivery job: {error}"));
            }
        };
        if let Some(info) = &info {
            self.fair.waited(info, &job);
        }
        let done = tokio::select! {
            done = self.deliver(&job, source) => done,
            _ = self.hard_stop.cancelled() => Done::HandBack(JobError::ShuttingDown),
        };
        match done {
            Done::Ack => Disposition::Ack,
            Done::HandBack(_) if self.hard_stop.is_cancelled() => {
                Disposition::HandBack(Duration::ZERO)
            }
            Done::HandBack(error) => self.own_failure(message, &job, &error).await,
        }
    }

    /// Herald's own failure stopped `job`: put it back after a wait that
    /// backs off, or dead-letter it once the trouble has lasted the give-up
    /// time (at once when it is permanent). It is not the receiver's
    /// attempt: no attempt record, only the metric and a rate-limited
    /// warning.
    async fn own_failure(
        &self,
        message: &jetstream::Message,
        job: &proto::DeliveryJob,
        error: &JobError,
    ) -> Disposition {
        self.metrics.herald_failures.inc();
        self.count("herald_failure");
        let now = now_ms();
        let since = if job.own_failure_since_ms > 0 {
            job.own_failure_since_ms
        } else {
            now
        };
        if error.is_permanent() {
            let reason = format!("herald's own failure, permanent: {error}");
            return self.give_up(message, job, &reason).await;
        }
        match self
            .policy
            .on_own_failure(&self.job_view(job), now, rand::random::<f64>())
        {
            Action::Retry { at_ms } => {
                if let Some(held) = self.own_failure_warnings.take() {
                    tracing::warn!(
                        %error,
                        delivery_id = %job.delivery_id,
                        webhook_id = %job.webhook_id,
                        failures = job.own_failures + 1,
                        retry_in_ms = at_ms - now,
                        others_since_last_warning = held,
                        "herald's own failure; the delivery waits"
                    );
                }
                let next = proto::DeliveryJob {
                    own_failures: job.own_failures.saturating_add(1),
                    own_failure_since_ms: since,
                    not_before_ms: at_ms,
                    ..job.clone()
                };
                let scheduled = if job.kind == proto::DeliveryKind::Probe as i32 {
                    self.outbox.probe_schedule(&next).await
                } else {
                    self.outbox.schedule(&next).await
                };
                match scheduled {
                    Ok(()) => Disposition::Ack,
                    // Not even a schedule can be published: hand the
                    // message back to the stream for as long.
                    Err(publish) => {
                        tracing::debug!(error = %publish, "cannot schedule the wait; handed back");
                        Disposition::HandBack(Duration::from_millis((at_ms - now).max(0) as u64))
                    }
                }
            }
            _ => {
                let lasted = herald_core::duration::format_duration(Duration::from_millis(
                    (now - since).max(0) as u64,
                ));
                let reason = format!("herald's own failure for {lasted}: {error}");
                self.give_up(message, job, &reason).await
            }
        }
    }

    /// Moves `job` to the dead letters with `reason` for an operator, its
    /// own-failure count cleared so that a redrive starts a new one.
    async fn give_up(
        &self,
        message: &jetstream::Message,
        job: &proto::DeliveryJob,
        reason: &str,
    ) -> Disposition {
        tracing::warn!(delivery_id = %job.delivery_id, webhook_id = %job.webhook_id, %reason, "delivery moved to the dead letters");
        let mut payload = proto::DeliveryJob {
            not_before_ms: 0,
            ..got_on(job)
        };
        // An ordered delivery given up this way does not hold its key: the
        // next ones go on, and a redrive sends it on its own (with the
        // sequence it had).
        if let Some(place) = payload.ordered.as_mut() {
            place.entry = 0;
        }
        let stream = message
            .info()
            .map(|i| i.stream)
            .unwrap_or(names::DELIVERIES_STREAM);
        match self
            .outbox
            .dead_letter(
                stream,
                &message.subject,
                payload.encode_to_vec().into(),
                reason,
            )
            .await
        {
            Ok(()) => {
                self.metrics.dead_letters.inc();
                if let Err(error) = self.conclude_key(job, Conclusion::Failed, false).await {
                    tracing::warn!(%error, "cannot hand on an ordered key after a dead letter; handed back");
                    return Disposition::HandBack(Duration::from_secs(5));
                }
                Disposition::Term
            }
            Err(error) => {
                tracing::warn!(%error, "cannot dead-letter a delivery job; handed back");
                Disposition::HandBack(Duration::from_secs(5))
            }
        }
    }

    fn job_view(&self, job: &proto::DeliveryJob) -> policy::Job {
        policy::Job {
            attempt: job.attempt.max(1),
            first_attempt_at_ms: job.first_attempt_at_ms,
            scheduled: job.kind == proto::DeliveryKind::Event as i32,
            own_failures: job.own_failures,
            own_failure_since_ms: job.own_failure_since_ms,
        }
    }

    fn record(&self, job: &proto::DeliveryJob) -> proto::AttemptResult {
        let event = job.event.as_ref();
        proto::AttemptResult {
            log_id: ids::log_id(&job.delivery_id, job.attempt),
            delivery_id: job.delivery_id.clone(),
            organization_id: job.organization_id.clone(),
            webhook_id: job.webhook_id.clone(),
            event_id: event.map(|e| e.id.clone()).unwrap_or_default(),
            event_type: event.map(|e| e.r#type.clone()).unwrap_or_default(),
            attempt: job.attempt,
            attempted_at_ms: now_ms(),
            kind: job.kind,
            // The event is read back from HERALD_ACCEPTED by its sequence;
            // only an event that is not there (a test) travels along.
            event: if job.event_seq == 0 {
                job.event.clone()
            } else {
                None
            },
            event_seq: job.event_seq,
            job_id: job.job_id.clone(),
            ordered: job.ordered.clone(),
            ..Default::default()
        }
    }

    async fn deliver(self: &Arc<Self>, job: &proto::DeliveryJob, source: u64) -> Done {
        if job.kind == proto::DeliveryKind::Probe as i32 {
            return self.probe_timer(job).await;
        }
        // An ordered delivery whose entry is gone was concluded already (a
        // redelivery after its conclusion): not sent again.
        if let Some(place) = job.ordered.as_ref().filter(|p| p.entry > 0) {
            match self
                .queues
                .is_open(&job.organization_id, &job.webhook_id, place)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    // Its conclusion may have been cut short after its
                    // entry's removal: the key's next is handed on (once).
                    self.count("concluded_before");
                    return finish(
                        self.queues
                            .hand_on(&job.organization_id, &job.webhook_id, &place.key)
                            .await,
                    );
                }
                Err(error) => return Done::HandBack(error.into()),
            }
        }
        let webhook = match self
            .webhooks
            .get(&job.organization_id, &job.webhook_id)
            .await
        {
            Ok(webhook) => webhook,
            Err(error) => return Done::HandBack(error.into()),
        };
        // Whatever follows is published from here (a trouble from here on
        // hands back the job as it came, its count going on).
        let job = &got_on(job);
        // Test and manual deliveries go to a disabled webhook too: that is
        // how a tenant checks it before re-enabling it.
        let one_off = one_off(job);
        let Some(webhook) = webhook.filter(|w| w.enabled || one_off) else {
            let mut attempt = self.record(job);
            attempt.set_status(proto::AttemptStatus::Skipped);
            attempt.error = "webhook deleted or disabled; not sent".into();
            self.count("skipped");
            if let Err(error) = self.outbox.attempt(&attempt).await {
                return Done::HandBack(error.into());
            }
            return finish(self.conclude_key(job, Conclusion::Skipped, false).await);
        };
        let hold = webhook.ordering.as_ref().is_some_and(|o| o.hold_on_failure);
        let view = self.job_view(job);
        let now = now_ms();
        let arrival = if one_off {
            Arrival::Send
        } else {
            let (state, _) = self.states.get(&webhook.id).await;
            match self.policy.on_arrival(&state, &view, now) {
                // Claiming the probe must be one replica's: decide again
                // under compare-and-set.
                (Arrival::Probe, _) => {
                    match self
                        .states
                        .update(&webhook.id, |s| {
                            self.policy.on_arrival(s, &view, now_ms()).swap()
                        })
                        .await
                    {
                        // Nothing is sent yet: decide again later rather
                        // than probe without the claim.
                        (_, _, Source::Contended) => {
                            return Done::HandBack(JobError::Contended);
                        }
                        (arrival, _, _) => arrival,
                    }
                }
                (arrival, _) => arrival,
            }
        };
        match arrival {
            Arrival::Send | Arrival::Probe => {}
            Arrival::Park => {
                self.count("parked");
                return finish(self.park(job, &webhook, source).await);
            }
            Arrival::Wait { until_ms } => {
                self.count("waiting");
                let next = proto::DeliveryJob {
                    not_before_ms: until_ms + (1_000.0 * rand::random::<f64>()) as i64,
                    ..job.clone()
                };
                return finish(self.outbox.schedule(&next).await);
            }
            Arrival::Expire => {
                let mut attempt = self.record(job);
                attempt.set_status(proto::AttemptStatus::Failed);
                attempt.failure_reason = FailureReason::Exhausted.code().into();
                attempt.error = "the delivery's deadline passed while it waited".into();
                self.count("failed");
                if let Err(error) = self
                    .announce(&webhook, &[Notice::Exhausted], job, None)
                    .await
                {
                    return Done::HandBack(error);
                }
                if let Err(error) = self.outbox.attempt(&attempt).await {
                    return Done::HandBack(error.into());
                }
                return finish(self.conclude_key(job, Conclusion::Failed, hold).await);
            }
        }
        let probe = arrival == Arrival::Probe;
        let key = (webhook.organization_id.clone(), webhook.id.clone());
        // An organization that could not send it after its endpoint's turn
        // holds it now, rather than have it wait for the turn in one of the
        // deliverer's slots.
        if !(probe || one_off) && self.fair.hold_early(job) {
            self.count("held");
            return finish(self.fair.hold(job, source).await);
        }
        let permit = if probe || one_off {
            None
        } else {
            match self.inflight.acquire_if_moving(&key).await {
                Some(permit) => Some(permit),
                None => {
                    // Its endpoint is at its limit and stalled: rather than
                    // hold one of the global slots, come back a little later.
                    let delay =
                        crate::inflight::deferral_delay(job.deferrals, rand::random::<f64>());
                    let next = proto::DeliveryJob {
                        deferrals: job.deferrals.saturating_add(1),
                        not_before_ms: now_ms() + delay.as_millis() as i64,
                        ..job.clone()
                    };
                    self.count("deferred");
                    self.fair.deferred();
                    return finish(self.outbox.schedule(&next).await);
                }
            }
        };
        // Its organization's share of the deliverer (`fair`), asked once
        // the endpoint has a turn for it, so that jobs waiting for a busy
        // endpoint never count against their organization (a slow webhook
        // would otherwise hold back its organization's healthy ones): over
        // it, the job is held back and others' work goes on.
        let share = if probe || one_off {
            None
        } else {
            match self.fair.admit(job) {
                crate::fair::Admission::Send(ticket) => ticket,
                crate::fair::Admission::Hold => {
                    self.count("held");
                    return finish(self.fair.hold(job, source).await);
                }
            }
        };
        let mut attempt = self.record(job);
        let outcome = self.send(job, &webhook, &mut attempt).await;
        let class = classify(&outcome);
        if let Some(permit) = &permit {
            match class {
                Class::Success => permit.answered(false),
                Class::Throttled { .. } => permit.answered(true),
                _ => {}
            }
        }
        drop((permit, share));
        // Nothing reached the receiver (its name did not resolve on
        // Herald's side, its secret cannot be read): not its attempt.
        // A probe gives its claim back: the job waits (backing off) and
        // the next delivery due probes, rather than everything parking
        // behind a claim nobody is using.
        if matches!(class, Class::Herald) {
            if probe {
                let now = now_ms();
                self.states
                    .update(&webhook.id, |s| (s.release_probe(now), ()))
                    .await;
            }
            return Done::HandBack(JobError::Attempt(outcome.error));
        }
        self.conclude(job, &webhook, attempt, outcome, class, probe, source)
            .await
    }

    /// Builds, signs and sends the request; fills in what was sent and got.
    async fn send(
        &self,
        job: &proto::DeliveryJob,
        webhook: &proto::Webhook,
        attempt: &mut proto::AttemptResult,
    ) -> Outcome {
        let event = job.event.clone().unwrap_or_default();
        let url = match url::Url::parse(&webhook.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => url,
            Ok(url) => {
                return Outcome::endpoint(format!("unsupported URL scheme {}", url.scheme()));
            }
            Err(error) => return Outcome::endpoint(format!("invalid URL: {error}")),
        };
        let format = Format::from(webhook.format());
        let body = Bytes::from(payload::render(&event, &webhook.id, format));
        let keys = match self.signing_keys(webhook, attempt.attempted_at_ms) {
            Ok(keys) if !keys.is_empty() => keys,
            Ok(_) => return Outcome::herald("webhook has no live secret; not sent".into()),
            // Herald's own configuration (HERALD_SECRET_KEY): not the
            // endpoint's fault, and no attempt is spent.
            Err(error) => return Outcome::herald(format!("cannot decrypt the secret: {error}")),
        };
        let timestamp = attempt.attempted_at_ms / 1000;
        // The url crate normalizes the host: numeric forms like 2130706433
        // become the dotted address the SSRF guard checks.
        let mut builder = ::http::Request::post(url.as_str())
            .header("content-type", format.content_type())
            .header("user-agent", concat!("Herald/", env!("CARGO_PKG_VERSION")))
            .header("webhook-id", &job.delivery_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signing::standard_signatures(&keys, &job.delivery_id, timestamp, &body),
            )
            .header("x-webhook-signature", keys[0].body_signature(&body));
        if let Some(traceparent) = trace::outgoing(&event.traceparent) {
            builder = builder.header("traceparent", traceparent);
        }
        // Its place in its key's order, for the receiver to check.
        if let Some(place) = job.ordered.as_ref().filter(|p| p.sequence > 0) {
            builder = builder
                .header("webhook-sequence", place.sequence.to_string())
                .header(
                    "webhook-ordering-key",
                    herald_core::ordering::header_value(&place.key),
                );
        }
        for (name, value) in &webhook.headers {
            builder = builder.header(name, value);
        }
        // Header values stored encrypted (often the receiver's credentials);
        // one that does not decrypt is Herald's own configuration, like a
        // secret: no attempt is spent.
        for (name, sealed) in &webhook.encrypted_headers {
            let aad = herald_core::secret::header_aad(&webhook.organization_id, &webhook.id, name);
            match self.config.keyring.decrypt(sealed, &aad) {
                Ok(value) => builder = builder.header(name, value),
                Err(error) => {
                    return Outcome::herald(format!("cannot decrypt header {name}: {error}"));
                }
            }
        }
        let request = match builder.body(http_body_util::Full::new(body.clone())) {
            Ok(request) => request,
            Err(error) => return Outcome::endpoint(format!("invalid request: {error}")),
        };
        attempt.request = Some(logged_request(&request, &body, self.config.log_body_limit));
        let timeout =
            Duration::from_millis(herald_core::webhook::timeout_ms(webhook.timeout_ms).into());
        let (result, took) = self.client.send(request, timeout).await;
        attempt.duration_ms = took.as_millis() as u64;
        self.metrics.attempt_duration.observe(took.as_secs_f64());
        // Every distinct host failing to connect at once, none answering:
        // Herald's network is down, not every receiver.
        let host = url.host_str().unwrap_or_default();
        let outage = {
            let mut connects = self.connects.lock().expect("connects");
            let was = connects.outage_since_ms().is_some();
            let now = now_ms();
            let outage = match &result {
                Ok(_) => {
                    connects.succeeded(host, now);
                    false
                }
                Err(crate::http::SendError::Connect(_) | crate::http::SendError::Network(_)) => {
                    connects.failed(host, now)
                }
                Err(_) => false,
            };
            if outage != was {
                if outage {
                    tracing::warn!(
                        "every endpoint is failing to connect: taken as Herald's own network being down; no webhook is counted against until one answers"
                    );
                } else {
                    tracing::info!("an endpoint answered: Herald's network is back");
                }
            }
            outage
        };
        let outcome = outcome::classify(result, SystemTime::now());
        if outage && outcome.endpoint_failure {
            return Outcome::herald(format!(
                "{} (every endpoint failing to connect at once: Herald's own network; not counted against the webhook)",
                outcome.error
            ));
        }
        outcome
    }

    /// Asks the policy what follows the attempt and carries it out.
    #[allow(clippy::too_many_arguments)]
    async fn conclude(
        self: &Arc<Self>,
        job: &proto::DeliveryJob,
        webhook: &proto::Webhook,
        mut attempt: proto::AttemptResult,
        outcome: Outcome,
        class: Class,
        probe: bool,
        source: u64,
    ) -> Done {
        attempt.error = outcome.error.clone();
        attempt.response = outcome.response.as_ref().map(|r| proto::HttpResponse {
            status: r.status as u32,
            headers: crate::outbox::capped_headers(&r.headers),
            body: r.body.clone(),
            body_truncated: r.truncated,
        });
        let view = self.job_view(job);
        let started = attempt.attempted_at_ms;
        let now = now_ms();
        let jitter = rand::random::<f64>();
        let one_off = one_off(job);
        let decided = self
            .states
            .update(&webhook.id, |state| {
                let d = self.policy.on_outcome(
                    state,
                    &view,
                    Attempted {
                        probe,
                        started_ms: started,
                        class: &class,
                    },
                    now,
                    jitter,
                );
                (d.endpoint.clone(), (d, state.clone()))
            })
            .await;
        // The request is sent: whatever Redis says, the attempt is concluded
        // here, never handed back to be sent again.
        let ((mut decision, before), after, source_of_state) = decided;
        if source_of_state != Source::Shared {
            // Redis cannot say (or kept changing).
            decision = self.policy.on_local_view(decision, &view);
        }
        let first = if job.first_attempt_at_ms > 0 {
            job.first_attempt_at_ms
        } else {
            started
        };
        match &decision.action {
            Action::Done => {
                attempt.set_status(proto::AttemptStatus::Succeeded);
                self.count("succeeded");
            }
            Action::Wait { until_ms } => {
                attempt.log_id =
                    ids::throttled_log_id(&job.delivery_id, job.attempt, job.throttles + 1);
                attempt.set_status(proto::AttemptStatus::Throttled);
                attempt.next_attempt_at_ms = *until_ms;
                let next = proto::DeliveryJob {
                    throttles: job.throttles + 1,
                    not_before_ms: *until_ms,
                    first_attempt_at_ms: first,
                    ..job.clone()
                };
                self.count("throttled");
                if let Err(error) = self.outbox.schedule(&next).await {
                    return Done::HandBack(error.into());
                }
            }
            Action::Park => {
                attempt.set_status(proto::AttemptStatus::Retrying);
                if let Endpoint::Failing {
                    next_probe_ms: Some(at),
                    ..
                } = &after
                {
                    attempt.next_attempt_at_ms = *at;
                }
                let next = proto::DeliveryJob {
                    attempt: job.attempt + 1,
                    first_attempt_at_ms: first,
                    deferrals: 0,
                    not_before_ms: 0,
                    ..job.clone()
                };
                self.count("retrying");
                if let Err(error) = self.park(&next, webhook, source).await {
                    return Done::HandBack(error);
                }
            }
            Action::Fail(reason) => {
                attempt.set_status(proto::AttemptStatus::Failed);
                if !one_off {
                    attempt.failure_reason = reason.code().into();
                }
                self.count("failed");
            }
            // Herald's own failures never get here (they are handed back
            // before), but if the policy said so, it is the same.
            Action::Retry { .. } | Action::DeadLetter => {
                return Done::HandBack(JobError::Attempt(outcome.error));
            }
        }
        if !matches!(decision.action, Action::Done) {
            tracing::info!(
                webhook_id = %webhook.id,
                delivery_id = %job.delivery_id,
                attempt = job.attempt,
                error = %outcome.error,
                state = after.name(),
                "delivery attempt failed"
            );
        }
        // A failed probe whose delivery is not parked (it ran out of
        // attempts, or was one of a kind that gets one) leaves the webhook
        // failing with its next probe due: the timer for it is set here,
        // since no park will.
        if probe
            && !matches!(decision.action, Action::Park)
            && let Endpoint::Failing {
                next_probe_ms: Some(next),
                ..
            } = &after
            && let Err(error) = self
                .outbox
                .probe_timer(&webhook.organization_id, &webhook.id, *next, now)
                .await
        {
            return Done::HandBack(error.into());
        }
        if let Err(error) = self
            .announce(webhook, &decision.notices, job, Some((&before, &after)))
            .await
        {
            return Done::HandBack(error);
        }
        if let Err(error) = self.outbox.attempt(&attempt).await {
            return Done::HandBack(error.into());
        }
        let how = match decision.action {
            Action::Done => Conclusion::Delivered,
            Action::Fail(_) => Conclusion::Failed,
            // Still the key's: it goes on after its wait.
            _ => return Done::Ack,
        };
        let hold = webhook.ordering.as_ref().is_some_and(|o| o.hold_on_failure);
        finish(self.conclude_key(job, how, hold).await)
    }

    /// `job`'s delivery concluded `how`: for an ordered webhook its key
    /// moves on (or is held on it), and the key's next delivery is handed
    /// on. Tried a few times in place: the attempt is already recorded, and
    /// handing the job back would send it again.
    async fn conclude_key(
        &self,
        job: &proto::DeliveryJob,
        how: Conclusion,
        hold: bool,
    ) -> Result<(), JobError> {
        if job.ordered.as_ref().is_none_or(|p| p.entry == 0) {
            return Ok(());
        }
        let mut pause = Duration::from_millis(100);
        loop {
            match self.queues.conclude(job, how, hold).await {
                Ok(()) => return Ok(()),
                Err(error) if pause < Duration::from_secs(2) && !self.hard_stop.is_cancelled() => {
                    tracing::debug!(%error, "cannot hand on an ordered key yet; trying again");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Parks `job` behind its failing webhook and makes sure a probe timer
    /// is set for the webhook's next probe.
    async fn park(
        &self,
        job: &proto::DeliveryJob,
        webhook: &proto::Webhook,
        source: u64,
    ) -> Result<(), JobError> {
        self.parking
            .park(job, source)
            .await
            .map_err(JobError::from)?;
        let (state, _) = self.states.get(&webhook.id).await;
        let at = match state.probe_timer() {
            // Being disabled: the timer drains what is parked, soon.
            ProbeTimer::Disabled => now_ms() + 1_000,
            // The next probe, or the end of the claim of the probe under
            // way (a job parked behind a claimed probe once set a timer
            // for a probe time already past: a timer every 100 ms until
            // the claim lapsed).
            ProbeTimer::At(at) => at,
            // Recovered meanwhile: release at once.
            ProbeTimer::NotFailing => now_ms(),
        };
        self.outbox
            .probe_timer(&webhook.organization_id, &webhook.id, at, now_ms())
            .await
            .map_err(JobError::from)
    }

    /// A failing webhook's probe timer fired.
    async fn probe_timer(self: &Arc<Self>, job: &proto::DeliveryJob) -> Done {
        let (org, id) = (job.organization_id.as_str(), job.webhook_id.as_str());
        let webhook = match self.webhooks.get(org, id).await {
            Ok(webhook) => webhook,
            Err(error) => return Done::HandBack(error.into()),
        };
        let Some(webhook) = webhook.filter(|w| w.enabled) else {
            // Deleted or disabled: what waited is logged, not lost.
            return finish(self.drain_disabled(org, id).await);
        };
        let (state, _) = self.states.get(&webhook.id).await;
        let result = match state.probe_timer() {
            // Being disabled: no probe is sent; the timer drains what is
            // parked once the disable is seen.
            ProbeTimer::Disabled => self
                .outbox
                .probe_timer(org, id, now_ms() + 1_000, now_ms())
                .await
                .map_err(JobError::from),
            ProbeTimer::At(at) if now_ms() + policy::PROBE_SLACK_MS < at => {
                // An older timer, or a probe under way: come back when the
                // next may be sent.
                self.outbox
                    .probe_timer(org, id, at, now_ms())
                    .await
                    .map_err(JobError::from)
            }
            ProbeTimer::At(_) => self
                .parking
                .release_oldest(org, id)
                .await
                .map(|_| ())
                .map_err(JobError::from),
            // Recovered: anything still parked goes now.
            ProbeTimer::NotFailing => self
                .parking
                .release_all(org, id)
                .await
                .map(|_| ())
                .map_err(JobError::from),
        };
        finish(result)
    }

    /// Logs every delivery parked for a disabled or deleted webhook as
    /// failed with `webhook_disabled`, so that `recover` finds it: a batch
    /// at a time, its attempt records in flight together. Before each
    /// batch the webhook is looked at again: re-enabled meanwhile, what is
    /// still parked is released (by its probe timer, set for now) instead.
    async fn drain_disabled(&self, org: &str, webhook_id: &str) -> Result<(), JobError> {
        let mut batches = self
            .parking
            .batches(org, webhook_id)
            .await
            .map_err(JobError::from)?;
        let mut n = 0;
        let mut reenabled = false;
        while let Some(batch) = batches.next().await.map_err(JobError::from)? {
            let webhook = self
                .webhooks
                .get(org, webhook_id)
                .await
                .map_err(JobError::from)?;
            if webhook.as_ref().is_some_and(|w| w.enabled) {
                reenabled = true;
                break;
            }
            let hold = webhook
                .and_then(|w| w.ordering.clone())
                .is_some_and(|o| o.hold_on_failure);
            let mut attempts = Vec::with_capacity(batch.parked.len());
            for parked in &batch.parked {
                let mut attempt = self.record(&parked.job);
                attempt.set_status(proto::AttemptStatus::Failed);
                attempt.failure_reason = FailureReason::WebhookDisabled.code().into();
                attempt.error =
                    "the webhook was disabled while the delivery waited; not sent".into();
                attempts.push(attempt);
            }
            // The batch's records all in flight, their acks awaited together.
            let publishes: Vec<_> = attempts.iter().map(|a| self.outbox.attempt(a)).collect();
            futures::future::try_join_all(publishes)
                .await
                .map_err(JobError::from)?;
            // An ordered key moves on past each (or holds on it): before the
            // batch is removed, so a drain cut short does it again.
            for parked in &batch.parked {
                self.conclude_key(&parked.job, Conclusion::Failed, hold)
                    .await?;
            }
            batches.remove(&batch).await.map_err(JobError::from)?;
            self.metrics
                .deliveries
                .get_or_create(&crate::metrics::OutcomeLabel { outcome: "failed" })
                .inc_by(batch.parked.len() as u64);
            n += batch.parked.len();
        }
        if n > 0 {
            tracing::info!(
                webhook_id,
                deliveries = n,
                "waiting deliveries of a disabled webhook logged as failed"
            );
        }
        if reenabled {
            tracing::info!(
                webhook_id,
                "webhook enabled again; what still waits is released"
            );
            self.outbox
                .probe_timer(org, webhook_id, now_ms(), now_ms())
                .await
                .map_err(JobError::from)?;
        }
        Ok(())
    }

    /// Sets the webhook's probe timer a few seconds ahead after a release
    /// or drain failed, so what is still parked is not stranded.
    async fn rearm_after_error(&self, org: &str, webhook_id: &str) {
        let at = now_ms() + REARM_AFTER_ERROR.as_millis() as i64;
        if let Err(error) = self.outbox.probe_timer(org, webhook_id, at, now_ms()).await {
            // The periodic sweep of parked webhooks sets it later.
            tracing::warn!(%error, webhook_id, "cannot set the probe timer again");
        }
    }

    /// Carries out the policy's notices: system events, disabling, and
    /// releasing or draining what waited.
    async fn announce(
        self: &Arc<Self>,
        webhook: &proto::Webhook,
        notices: &[Notice],
        job: &proto::DeliveryJob,
        states: Option<(&Endpoint, &Endpoint)>,
    ) -> Result<(), JobError> {
        let now = now_ms();
        for notice in notices {
            match notice {
                Notice::Failing => {
                    let (since, next) = match states.map(|(_, after)| after) {
                        Some(Endpoint::Failing {
                            since_ms,
                            next_probe_ms,
                            ..
                        }) => (*since_ms, *next_probe_ms),
                        _ => (now, Some(now)),
                    };
                    self.system_event(webhook, catalogue::WEBHOOK_FAILING, since.to_string(), vec![], serde_json::json!({"url": webhook.url, "name": webhook.name, "error": job_error(states)}), now).await?;
                    // No probe is ever due when the same failure disables
                    // it (disable_after 0): no timer.
                    if let Some(next) = next {
                        self.outbox
                            .probe_timer(&webhook.organization_id, &webhook.id, next, now)
                            .await
                            .map_err(JobError::from)?;
                    }
                }
                Notice::Recovered => {
                    let since = match states.map(|(before, _)| before) {
                        Some(Endpoint::Failing { since_ms, .. }) => *since_ms,
                        _ => now,
                    };
                    self.system_event(
                        webhook,
                        catalogue::WEBHOOK_RECOVERED,
                        since.to_string(),
                        vec![],
                        serde_json::json!({"url": webhook.url, "name": webhook.name}),
                        now,
                    )
                    .await?;
                    let (this, org, id) = (
                        self.clone(),
                        webhook.organization_id.clone(),
                        webhook.id.clone(),
                    );
                    tokio::spawn(async move {
                        match this.parking.release_all(&org, &id).await {
                            Ok(n) if n > 0 => {
                                tracing::info!(webhook_id = %id, deliveries = n, "webhook recovered; waiting deliveries released")
                            }
                            Ok(_) => {}
                            // The probe timer, set again, releases what is left.
                            Err(error) => {
                                tracing::warn!(%error, webhook_id = %id, "cannot release waiting deliveries");
                                this.rearm_after_error(&org, &id).await;
                            }
                        }
                    });
                }
                Notice::Disable(reason) => {
                    self.disable(webhook, reason).await?;
                    let (this, org, id) = (
                        self.clone(),
                        webhook.organization_id.clone(),
                        webhook.id.clone(),
                    );
                    tokio::spawn(async move {
                        if let Err(error) = this.drain_disabled(&org, &id).await {
                            tracing::warn!(%error, webhook_id = %id, "cannot log the waiting deliveries of a disabled webhook yet");
                            this.rearm_after_error(&org, &id).await;
                        }
                    });
                }
                Notice::Exhausted => {
                    let event_id = job.event.as_ref().map(|e| e.id.clone()).unwrap_or_default();
                    self.system_event(
                        webhook,
                        catalogue::DELIVERY_EXHAUSTED,
                        job.delivery_id.clone(),
                        vec![("event", event_id.clone())],
                        serde_json::json!({"delivery_id": job.delivery_id, "event_id": event_id, "attempts": job.attempt}),
                        now,
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }

    async fn system_event(
        &self,
        webhook: &proto::Webhook,
        r#type: &'static str,
        dedupe: String,
        mut attributes: Vec<(&'static str, String)>,
        data: serde_json::Value,
        now: i64,
    ) -> Result<(), JobError> {
        attributes.push(("webhook", webhook.id.clone()));
        self.outbox
            .system_event(SystemEvent {
                r#type,
                webhook,
                dedupe,
                attributes,
                data,
                now_ms: now,
            })
            .await
            .map_err(|source| JobError::SystemEvent {
                kind: r#type,
                source,
            })
    }

    /// Disables the webhook and announces `webhook.disabled`, once.
    async fn disable(
        &self,
        webhook: &proto::Webhook,
        reason: &DisableReason,
    ) -> Result<(), JobError> {
        let reason = reason.to_string();
        let now = now_ms();
        let mut changed = false;
        let stored = self
            .webhooks
            .store()
            .modify(&webhook.organization_id, &webhook.id, |w| {
                changed = w.enabled;
                if w.enabled {
                    w.enabled = false;
                    w.disabled_reason = reason.clone();
                    w.updated_at_ms = now;
                }
                changed
            })
            .await
            .map_err(JobError::from)?;
        let Some(w) = stored else {
            return Ok(());
        };
        // Jobs already queued are skipped from now on, without waiting for
        // the bucket's change feed.
        self.webhooks.remember(w.clone());
        if changed {
            self.metrics.disabled.inc();
            tracing::warn!(webhook_id = %w.id, org = %w.organization_id, %reason, "webhook disabled");
        }
        // Announced with an id of this disabling (its time), so a job
        // decided again after a crash announces it once.
        self.system_event(
            &w,
            catalogue::WEBHOOK_DISABLED,
            w.updated_at_ms.to_string(),
            vec![("reason", reason)],
            serde_json::json!({"reason": w.disabled_reason, "url": w.url, "name": w.name}),
            now,
        )
        .await
    }

    fn signing_keys(
        &self,
        webhook: &proto::Webhook,
        now_ms: i64,
    ) -> Result<Vec<SigningKey>, herald_core::secret::DecryptError> {
        let aad = names::webhook_key(&webhook.organization_id, &webhook.id);
        webhook
            .secrets
            .iter()
            .filter(|s| s.expires_at_ms == 0 || s.expires_at_ms > now_ms)
            .map(|s| {
                self.config
                    .keyring
                    .decrypt(s, &aad)
                    .map(|plain| SigningKey::new(&plain))
            })
            .collect()
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .deliveries
            .get_or_create(&crate::metrics::OutcomeLabel { outcome })
            .inc();
    }
}

/// A one-off job — a test or a manual retry, sent by a tenant's call: it
/// goes to a disabled webhook too and whatever its endpoint's state (no
/// probe, no parking, no limits), and its failure has no reason code.
fn one_off(job: &proto::DeliveryJob) -> bool {
    matches!(
        proto::DeliveryKind::try_from(job.kind),
        Ok(proto::DeliveryKind::Test | proto::DeliveryKind::ManualRetry)
    )
}

fn job_error(states: Option<(&Endpoint, &Endpoint)>) -> String {
    match states.map(|(_, after)| after) {
        Some(Endpoint::Failing { last_error, .. }) => last_error.clone(),
        _ => String::new(),
    }
}

/// How the policy sees an attempt's outcome.
fn classify(outcome: &Outcome) -> Class {
    if outcome.succeeded() {
        Class::Success
    } else if outcome.throttled {
        Class::Throttled {
            retry_after_ms: outcome.retry_after.map(|d| d.as_millis() as i64),
        }
    } else if outcome.endpoint_failure {
        Class::Endpoint {
            gone: outcome.gone,
            error: outcome.error.clone(),
        }
    } else {
        Class::Herald
    }
}

/// The request as logged: secret-looking headers and URL query values
/// masked, the body cut at `limit` bytes.
fn logged_request(
    request: &::http::Request<http_body_util::Full<Bytes>>,
    body: &Bytes,
    limit: usize,
) -> proto::HttpRequest {
    let headers = request
        .headers()
        .iter()
        .map(|(name, value)| {
            let n = name.as_str();
            let value = if masking::secret_name(n) {
                masking::MASK.to_owned()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            proto::Header {
                name: n.to_owned(),
                value,
            }
        })
        .collect();
    proto::HttpRequest {
        method: "POST".into(),
        url: masking::mask_url(&request.uri().to_string()),
        headers,
        body: body.slice(..body.len().min(limit)),
        body_truncated: body.len() > limit,
        body_size: body.len() as u64,
    }
}

/// `(Arrival, Option<Endpoint>)` as `update` wants it: state first.
trait Swap {
    fn swap(self) -> (Option<Endpoint>, Arrival);
}

impl Swap for (Arrival, Option<Endpoint>) {
    fn swap(self) -> (Option<Endpoint>, Arrival) {
        (self.1, self.0)
    }
}
