//! Test fixtures against the real thing: `nats-server -js` (alone, or three
//! in a cluster) and `redis-server` started on free loopback ports in
//! temporary directories and killed on drop, and a recording HTTP receiver that can answer any
//! status, hang, or answer slowly.
//!
//! A missing server binary panics with how to install it: tests never skip
//! silently (and under `CI=true` that is a failed run, as it should be).

mod receiver;
mod servers;
mod streams;

pub use receiver::{Received, Receiver, Reply};
pub use servers::{NatsCluster, NatsServer, RedisCluster, RedisServer, free_port};
pub use streams::stored;
