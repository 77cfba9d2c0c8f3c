//! The worker loop every consuming service shares: its durable consumer
//! created (retrying while NATS is not ready), pulled in bounded batches
//! (messages and bytes) through [`nats::Pull`], each message processed and
//! then settled by the [`Disposition`] its handler returns — ack, hand back
//! after a delay, dead-letter with the reason — and, at shutdown, what is in
//! hand finished while what was pulled but not started is handed back.
//!
//! A message delivered more than the consumer's `max_deliveries` times
//! (handed back again and again, or held by replicas that died) is not
//! processed again: [`Handler::exhausted`] decides what becomes of it (by
//! default, the dead letters with the count). Long work keeps its claim with
//! progress acks ([`Spec::progress_every`]), so it is not redelivered to
//! another replica and done twice meanwhile.
//!
//! ingest and matcher process message by message on the worker's own task
//! ([`Worker::each`]: short work, pulled ahead); the deliverer each message
//! in a task of its own within slots it shares with the held jobs it
//! releases ([`Worker::each_within`], pulled on demand); log-writer a batch
//! at a time ([`Worker::batches`]). A message read from elsewhere (the deliverer's
//! held jobs) goes the same way through [`process`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message, consumer};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use herald_core::gather::{Arrivals, Gather};

use crate::health::Health;
use crate::{dead_letters, metrics, nats, trace};

/// What becomes of a message once it has been processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Done: everything it produced is stored.
    Ack,
    /// Herald's own passing trouble: deliver it again after the delay
    /// (zero: as soon as the server will).
    HandBack(Duration),
    /// It can never be processed: to the dead letters with the reason.
    DeadLetter(String),
    /// Concluded by the handler itself (e.g. set aside whole): never
    /// delivered again.
    Term,
}

/// The consumer a worker reads, and how.
#[derive(Debug, Clone)]
pub struct Spec {
    pub stream: &'static str,
    /// Durable name (shared by all replicas).
    pub durable: &'static str,
    /// The subjects of the stream it reads ("": all of them).
    pub filter: &'static str,
    pub ack_wait: Duration,
    pub max_ack_pending: i64,
    /// Messages one pull asks for, at most.
    pub batch: usize,
    /// Bytes one pull asks for, at most (0: no cap).
    pub max_bytes: usize,
    /// Deliveries of one message, at most, before [`Handler::exhausted`]
    /// takes it instead of [`Handler::handle`]; at most
    /// [`dead_letters::MAX_HAND_BACKS`].
    pub max_deliveries: i64,
    /// A progress ack this often while a message is processed (a third of
    /// the ack wait), for work that may outlast the ack wait.
    pub progress_every: Option<Duration>,
    /// The span each message is processed in (`trace::message_span`).
    pub operation: &'static str,
    /// How [`Worker::each`] gathers messages arriving at a moderate rate
    /// to start them together ([`Gather::OFF`]: each as it comes).
    pub gather: Gather,
}

/// How long an on-demand pull request waits at the server for messages.
const ON_DEMAND_EXPIRES: Duration = Duration::from_millis(500);

impl Spec {
    /// The durable pull consumer this spec describes. Every consumer's
    /// `max_deliver` is [`dead_letters::MAX_DELIVER`]: a backstop above
    /// the hand-backs, so the worker always sees a message first.
    fn consumer_config(&self) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(self.durable.into()),
            filter_subject: self.filter.into(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_ack_pending: self.max_ack_pending,
            max_deliver: dead_letters::MAX_DELIVER,
            ..Default::default()
        }
    }
}

/// What a service does with each message.
pub trait Handler: Send + Sync + 'static {
    /// Processes `message`; what it returns is carried out.
    fn handle(&self, message: &Message) -> impl Future<Output = Disposition> + Send;

    /// A message delivered `delivered` times, more than the consumer's
    /// `max_deliveries`: by default, to the dead letters.
    fn exhausted(
        &self,
        _message: &Message,
        delivered: i64,
    ) -> impl Future<Output = Disposition> + Send {
        std::future::ready(Disposition::DeadLetter(format!(
            "handed back {} times for Herald's own trouble",
            delivered - 1
        )))
    }

    /// Whether `message` is known at once to be somebody else's (another
    /// consumer works it: a lane's message in the main consumer), so it is
    /// acked unread without a task of its own. Only a decision that needs
    /// no IO; anything else goes to [`Handler::handle`].
    fn unread(&self, _message: &Message) -> bool {
        false
    }

    /// The [`InOrder`] through which this handler takes a step in the
    /// order its messages were pulled, if it has one: the worker loop
    /// enters each message before its work starts and lets it pass when
    /// its work is done (if the handler did not before).
    fn in_order(&self) -> Option<&InOrder> {
        None
    }
}

/// Lets the handlers of a consumer's messages take one step — a publish
/// whose order matters — in the order the messages were pulled (their
/// stream sequence), while the rest of their work runs concurrently: a
/// message's step waits only for the messages of the same consumer pulled
/// before it that are still before theirs. Each consumer (a stage's main
/// one, each lane) keeps its own order, so one's slow messages never hold
/// up another's.
#[derive(Default)]
pub struct InOrder {
    entered: std::sync::Mutex<std::collections::BTreeSet<Position>>,
    passed: tokio::sync::Notify,
}

/// A message's place for [`InOrder`]: its consumer and stream sequence.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    consumer: String,
    seq: u64,
}

impl Position {
    /// `None` for a message without JetStream metadata.
    pub fn of(message: &Message) -> Option<Position> {
        let info = message.info().ok()?;
        Some(Position {
            consumer: info.consumer.to_owned(),
            seq: info.stream_sequence,
        })
    }
}

impl InOrder {
    fn enter(&self, at: Position) {
        self.entered.lock().expect("in order").insert(at);
    }

    /// Waits until every message of `at`'s consumer entered before it has
    /// passed.
    pub async fn turn(&self, at: &Position) {
        let first = Position {
            consumer: at.consumer.clone(),
            seq: 0,
        };
        loop {
            let passed = self.passed.notified();
            let mut passed = std::pin::pin!(passed);
            passed.as_mut().enable();
            let before = self
                .entered
                .lock()
                .expect("in order")
                .range(&first..at)
                .next()
                .is_some();
            if !before {
                return;
            }
            passed.await;
        }
    }

    /// `at` took its step (or has none to take): those after it may go.
    pub fn pass(&self, at: &Position) {
        if self.entered.lock().expect("in order").remove(at) {
            self.passed.notify_waiters();
        }
    }
}

/// Carries out dispositions for one consumer's messages; cloneable, for a
/// handler that settles some messages of a batch early.
#[derive(Clone)]
pub struct Settle {
    js: jetstream::Context,
    stream: &'static str,
    /// Counts the messages moved to the dead letters, when the service
    /// exposes that.
    dead_letters: Option<Counter>,
}

impl Settle {
    /// Settles messages of `stream`, counting those moved to the dead
    /// letters in `dead_letters`.
    pub fn new(
        js: jetstream::Context,
        stream: &'static str,
        dead_letters: Option<Counter>,
    ) -> Self {
        Self {
            js,
            stream,
            dead_letters,
        }
    }

    pub async fn settle(&self, message: &Message, disposition: Disposition) {
        match disposition {
            Disposition::Ack => {
                if let Err(error) = message.ack().await {
                    tracing::warn!(%error, subject = %message.subject, "ack failed; the message will be redelivered");
                }
            }
            Disposition::HandBack(delay) => {
                let delay = (!delay.is_zero()).then_some(delay);
                let _ = message.ack_with(AckKind::Nak(delay)).await;
            }
            Disposition::DeadLetter(reason) => {
                if let Some(counter) = &self.dead_letters {
                    counter.inc();
                }
                if let Err(error) =
                    dead_letters::terminate(&self.js, self.stream, message, &reason).await
                {
                    tracing::warn!(%error, stream = self.stream, "cannot move a message to the dead letters; handed back");
                }
            }
            Disposition::Term => {
                let _ = message.ack_with(AckKind::Term).await;
            }
        }
    }
}

/// A started consumer: its messages, and how to settle them.
pub struct Worker {
    spec: Spec,
    consumer: consumer::Consumer<consumer::pull::Config>,
    settle: Settle,
    client: async_nats::Client,
}

impl Worker {
    /// Creates (or updates) the durable consumer, retrying until NATS
    /// answers or `shutdown`, follows its pending counts in the metrics,
    /// starts pulling, and sets the `consumer` health check.
    pub async fn start(
        js: &jetstream::Context,
        health: &Health,
        spec: Spec,
        dead_letters: Option<Counter>,
        shutdown: &CancellationToken,
    ) -> Result<Self, nats::Error> {
        let consumer =
            nats::durable_consumer(js, spec.stream, spec.consumer_config(), shutdown).await?;
        metrics::watch_consumer(health, &consumer, spec.durable, shutdown.clone());

        health.set("consumer", true);
        Ok(Self {
            settle: Settle::new(js.clone(), spec.stream, dead_letters),
            client: js.client(),
            spec,
            consumer,
        })
    }

    /// A worker on a consumer made elsewhere (a lane's), settling as
    /// `settle` does.
    pub(crate) fn on(
        js: &jetstream::Context,
        consumer: consumer::Consumer<consumer::pull::Config>,
        spec: Spec,
        settle: Settle,
    ) -> Self {
        Self {
            spec,
            consumer,
            settle,
            client: js.client(),
        }
    }

    /// The consumer it reads, and how.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The settling of this worker's messages, for a batch handler.
    pub fn settler(&self) -> Settle {
        self.settle.clone()
    }

    /// Processes messages one by one on this task, up to `concurrency` at
    /// once, until `shutdown`; then finishes those started and hands back
    /// the rest. Messages are pulled ahead of the work (up to `batch`), the
    /// fastest for short work; at a moderate rate they are gathered and
    /// started together, as [`Spec::gather`] says.
    pub async fn each<H: Handler>(
        self,
        handler: Arc<H>,
        concurrency: usize,
        shutdown: &CancellationToken,
    ) {
        let slots = Arc::new(Semaphore::new(concurrency));
        self.run(handler, slots, Pulling::Ahead, shutdown).await
    }

    /// Each message in a task of its own (signing and TLS spread over every
    /// core) within `slots`, which others hold too (the deliverer's released
    /// jobs), pulling on demand: one short pull
    /// request at a time for no more messages than slots are free, so a
    /// message is in hand only once its work can start. For work that may
    /// hold every slot for long: no message waits in hand past its ack
    /// wait, and at shutdown no pull request is left for nobody to read.
    pub async fn each_within<H: Handler>(
        self,
        handler: Arc<H>,
        slots: Arc<Semaphore>,
        shutdown: &CancellationToken,
    ) {
        self.run(handler, slots, Pulling::OnDemand, shutdown).await
    }

    /// At `shutdown` what was pulled but not started is handed back at
    /// once, and this returns when every message it started is settled
    /// (the handler decides how long that may take).
    async fn run<H: Handler>(
        self,
        handler: Arc<H>,
        slots: Arc<Semaphore>,
        pulling: Pulling,
        shutdown: &CancellationToken,
    ) {
        let Worker {
            spec,
            consumer,
            settle,
            client,
        } = self;
        let mut tasks = JoinSet::new();
        let start = |message: Message, slot: OwnedSemaphorePermit, tasks: &mut JoinSet<()>| {
            let span = trace::message_span(
                spec.operation,
                &message.subject,
                message.headers.as_ref(),
                "",
            );
            let (handler, settle, own) = (handler.clone(), settle.clone(), spec.clone());
            enter(&*handler, &message);
            tasks.spawn(
                async move {
                    process(&*handler, &settle, &own, message).await;
                    drop(slot);
                }
                .instrument(span),
            );
            while let Some(done) = tasks.try_join_next() {
                report_panic(done, spec.durable);
            }
        };
        match pulling {
            Pulling::Ahead => {
                // Short work, all of it on this task: cheaper than a task
                // each (measured: make bench, docs/benchmarks.md).
                let concurrency = slots.available_permits();
                let mut pull = nats::Pull::new(consumer, spec.batch, spec.max_bytes);
                let mut in_flight = FuturesUnordered::new();
                // Gathered at a moderate rate to start together (`Spec::gather`).
                let mut gathered: Vec<Message> = Vec::new();
                let mut arrivals = Arrivals::default();
                let clock = tokio::time::Instant::now();
                let window = tokio::time::sleep(Duration::ZERO);
                tokio::pin!(window);
                loop {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break,
                        Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                        () = &mut window, if !gathered.is_empty() => {
                            in_flight.extend(gathered.drain(..).map(|m| begin(&*handler, &settle, &spec, m)));
                        }
                        message = pull.next(), if in_flight.len() + gathered.len() < concurrency => match message {
                            // A burst another consumer works is skipped at
                            // the pace it is read.
                            Some(Ok(message)) if handler.unread(&message) => {
                                if let Err(error) = message.ack().await {
                                    tracing::warn!(%error, consumer = spec.durable, "ack failed; the message will be redelivered");
                                }
                            }
                            Some(Ok(message)) => {
                                arrivals.arrived(clock.elapsed().as_micros() as u64);
                                if !gathered.is_empty() {
                                    gathered.push(message);
                                } else if spec.gather.waits(&arrivals) {
                                    // The first of a batch opens its window.
                                    window.as_mut().reset(tokio::time::Instant::now() + spec.gather.max);
                                    gathered.push(message);
                                } else {
                                    in_flight.push(begin(&*handler, &settle, &spec, message));
                                }
                                if spec.gather.full(gathered.len()) {
                                    in_flight.extend(gathered.drain(..).map(|m| begin(&*handler, &settle, &spec, m)));
                                }
                            }
                            Some(Err(error)) => {
                                tracing::warn!(%error, consumer = spec.durable, "consumer error");
                            }
                            None => break,
                        },
                    }
                }
                // Pulled but not started: handed back at once, while what
                // was started finishes.
                for message in gathered {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
                let hand_back = crate::shutdown::hand_back(&mut pull);
                futures::join!(in_flight.collect::<()>(), hand_back);
            }
            Pulling::OnDemand => {
                on_demand(&consumer, &spec, &slots, shutdown, |message, slot| {
                    start(message, slot, &mut tasks)
                })
                .await;
                finish(&mut tasks, spec.durable).await;
            }
        }
        nats::flush(&client).await;
    }

    /// Processes the pulled messages a batch at a time, until `shutdown`:
    /// a batch is up to `size` messages, taken from the first one on for up
    /// to `linger` (at full speed a batch fills at once; at a moderate rate
    /// it gathers what `linger` brings rather than one or two messages, so
    /// the per-batch work — a round trip to Redis, a script — is paid once
    /// for many). `handle` returns each message with its disposition (it
    /// may settle some itself first, through [`Worker::settler`]). What
    /// was pulled but not started is handed back.
    pub async fn batches<F, Fut>(
        self,
        size: usize,
        linger: Duration,
        shutdown: &CancellationToken,
        mut handle: F,
    ) where
        F: FnMut(Vec<Message>) -> Fut,
        Fut: Future<Output = Vec<(Message, Disposition)>>,
    {
        let mut pull = nats::Pull::new(self.consumer, self.spec.batch, self.spec.max_bytes);
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                first = pull.next() => match first {
                    Some(first) => first,
                    None => break,
                },
            };
            let mut batch = Vec::with_capacity(size);
            batch.push(first);
            let until = tokio::time::Instant::now() + linger;
            while batch.len() < size {
                match tokio::time::timeout_at(until, pull.next()).await {
                    Ok(Some(message)) => batch.push(message),
                    Ok(None) | Err(_) => break,
                }
            }
            let mut messages = Vec::with_capacity(batch.len());
            for message in batch {
                match message {
                    Ok(message) => messages.push(message),
                    Err(error) => {
                        tracing::warn!(%error, consumer = self.spec.durable, "consumer error")
                    }
                }
            }
            for (message, disposition) in handle(messages).await {
                self.settle.settle(&message, disposition).await;
            }
        }
        crate::shutdown::hand_back(&mut pull).await;
        nats::flush(&self.client).await;
    }
}

/// How a worker pulls.
enum Pulling {
    /// [`nats::Pull`]: continuous pull requests of up to `batch` messages.
    Ahead,
    /// [`on_demand`].
    OnDemand,
}

/// Waits until every started task has ended.
async fn finish(tasks: &mut JoinSet<()>, consumer: &str) {
    while let Some(done) = tasks.join_next().await {
        report_panic(done, consumer);
    }
}

/// Pulls on demand until `shutdown`: waits for a free slot, asks for no
/// more messages than slots are free, and hands each, with its slot, to
/// `start`. A pull request dies with its consumer's leader (a NATS node
/// lost) and nothing says so; it is given up 1 s after its expiry and made
/// again, of whichever node leads then.
async fn on_demand(
    consumer: &consumer::Consumer<consumer::pull::Config>,
    spec: &Spec,
    slots: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    mut start: impl FnMut(Message, OwnedSemaphorePermit),
) {
    while !shutdown.is_cancelled() {
        // Wait for a free slot without holding it.
        let free = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => {
                drop(slot.expect("slots are never closed"));
                slots.available_permits()
            }
        };
        let mut request = consumer
            .batch()
            .max_messages(free.clamp(1, spec.batch))
            .expires(ON_DEMAND_EXPIRES);
        if spec.max_bytes > 0 {
            request = request.max_bytes(spec.max_bytes);
        }
        let mut batch = match request.messages().await {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(%error, consumer = spec.durable, "cannot pull");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                }
            }
        };
        let give_up = tokio::time::Instant::now() + ON_DEMAND_EXPIRES + Duration::from_secs(1);
        loop {
            let message = match tokio::time::timeout_at(give_up, batch.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(error))) => {
                    tracing::warn!(%error, consumer = spec.durable, "consumer error");
                    continue;
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        consumer = spec.durable,
                        "pull request unanswered past its expiry; pulling again"
                    );
                    break;
                }
            };
            if shutdown.is_cancelled() {
                // Pulled but not started: another replica takes it now.
                let _ = message.ack_with(AckKind::Nak(None)).await;
                continue;
            }
            // Never more were asked for than slots were free (others, such
            // as the deliverer's released jobs, may have taken one since:
            // then this waits for the next).
            let slot = slots
                .clone()
                .acquire_owned()
                .await
                .expect("slots are never closed");
            start(message, slot);
        }
    }
}

/// A task that panicked left its message unsettled: the server
/// redelivers it after the ack wait (and dead-letters it once it has done
/// so too often). Said, so that it is seen.
fn report_panic(done: Result<(), tokio::task::JoinError>, consumer: &str) {
    if let Err(error) = done {
        tracing::error!(%error, consumer, "a message's task failed; it is redelivered after the ack wait");
    }
}

/// Starts `message`'s work, in its span, entered in its handler's order.
fn begin<'a, H: Handler>(
    handler: &'a H,
    settle: &'a Settle,
    spec: &'a Spec,
    message: Message,
) -> impl Future<Output = ()> + 'a {
    let span = trace::message_span(
        spec.operation,
        &message.subject,
        message.headers.as_ref(),
        "",
    );
    enter(handler, &message);
    process(handler, settle, spec, message).instrument(span)
}

/// Enters `message` in its handler's [`InOrder`], in the order pulled.
fn enter<H: Handler>(handler: &H, message: &Message) {
    if let Some(order) = handler.in_order()
        && let Some(at) = Position::of(message)
    {
        order.enter(at);
    }
}

/// One message through a handler: exhausted (delivered more than
/// `spec.max_deliveries` times) or handled, keeping its claim with progress
/// acks while it runs when `spec.progress_every` says so; then settled.
pub async fn process<H: Handler>(handler: &H, settle: &Settle, spec: &Spec, message: Message) {
    /// Lets the message pass however its work ends (a panic included).
    struct Passes<'a>(Option<(&'a InOrder, Position)>);
    impl Drop for Passes<'_> {
        fn drop(&mut self) {
            if let Some((order, at)) = &self.0 {
                order.pass(at);
            }
        }
    }
    let _passes = Passes(handler.in_order().zip(Position::of(&message)));
    let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
    let disposition = if delivered > spec.max_deliveries {
        handler.exhausted(&message, delivered).await
    } else if let Some(every) = spec.progress_every {
        nats::keep_claimed(&message, every, handler.handle(&message)).await
    } else {
        handler.handle(&message).await
    };
    settle.settle(&message, disposition).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_step_waits_for_its_consumers_earlier_messages_only() {
        let at = |consumer: &str, seq| Position {
            consumer: consumer.into(),
            seq,
        };
        let order = std::sync::Arc::new(InOrder::default());
        for p in [at("main", 5), at("main", 7), at("lane", 6)] {
            order.enter(p);
        }
        // Another consumer's earlier message does not hold a step up, nor
        // does the first of its own.
        order.turn(&at("lane", 6)).await;
        order.turn(&at("main", 5)).await;
        let later = {
            let order = order.clone();
            tokio::spawn(async move { order.turn(&at("main", 7)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!later.is_finished(), "7 waits for 5");
        order.pass(&at("main", 5));
        tokio::time::timeout(Duration::from_secs(1), later)
            .await
            .expect("7 goes once 5 passed")
            .unwrap();
    }

    #[test]
    fn every_consumer_has_the_dead_letter_backstop() {
        let spec = Spec {
            stream: "S",
            durable: "d",
            filter: "s.>",
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 10,
            batch: 5,
            max_bytes: 0,
            max_deliveries: dead_letters::MAX_HAND_BACKS,
            progress_every: None,
            operation: "test",
            gather: Gather::OFF,
        };
        let config = spec.consumer_config();
        assert_eq!(config.durable_name.as_deref(), Some("d"));
        assert_eq!(config.filter_subject, "s.>");
        assert_eq!(config.max_deliver, dead_letters::MAX_DELIVER);
        assert!(config.max_deliver > spec.max_deliveries);
        assert_eq!(config.ack_policy, consumer::AckPolicy::Explicit);
    }
}
