//! Herald's domain rules, free of IO: the names of subjects, streams and
//! buckets; event validation; webhook matching; signing; secret encryption;
//! retry schedules. Every service builds on these; none of it touches the
//! network, a clock it cannot be given, or tokio.

pub mod catalogue;
pub mod duration;
pub mod egress;
pub mod event;
pub mod fairness;
pub mod gather;
pub mod ids;
pub mod lanes;
pub mod masking;
pub mod matching;
pub mod names;
pub mod ordering;
pub mod payload;
pub mod policy;
pub mod rate;
pub mod recovery;
pub mod retry;
pub mod secret;
pub mod signing;
pub mod webhook;

pub use herald_proto::v1 as proto;

/// Herald's version, sent as `User-Agent: Herald/<version>`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
