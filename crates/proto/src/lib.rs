//! Rust types generated from `proto/herald/v1/herald.proto`. Nothing here is
//! written by hand; services convert to `herald-core` types at the edge.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/herald.v1.rs"));
}

pub use prost::Message;
