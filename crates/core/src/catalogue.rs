//! The catalogue of event types tenants can subscribe to. Operators extend it
//! with `HERALD_EXTRA_EVENT_TYPES`.

use serde::Serialize;

use crate::matching;
use crate::names::valid_event_type;

pub const DEFAULT: &[(&str, &str)] = &[
    ("workflow.started", "An execution began"),
    ("workflow.completed", "An execution ended successfully"),
    ("workflow.failed", "An execution failed"),
    ("workflow.timed_out", "An execution timed out"),
    ("workflow.canceled", "An execution was canceled"),
    (
        "workflow.waiting",
        "An execution waits for an external trigger",
    ),
    (
        "workflow.step.started",
        "A step (task, activity, action) began",
    ),
    ("workflow.step.completed", "A step ended successfully"),
    ("workflow.step.failed", "A step failed"),
    (
        "workflow.definition.created",
        "A workflow (state machine, flow, rule) definition was created",
    ),
    (
        "workflow.definition.updated",
        "A workflow definition was updated",
    ),
    (
        "workflow.definition.deleted",
        "A workflow definition was deleted",
    ),
    ("worker.connected", "A worker joined"),
    ("worker.disconnected", "A worker left"),
];

/// A webhook became failing.
pub const WEBHOOK_FAILING: &str = "webhook.failing";
/// A failing webhook's probe succeeded.
pub const WEBHOOK_RECOVERED: &str = "webhook.recovered";
/// A webhook was disabled.
pub const WEBHOOK_DISABLED: &str = "webhook.disabled";
/// A delivery's retry schedule ran out.
pub const DELIVERY_EXHAUSTED: &str = "delivery.exhausted";

/// Herald's own events (PRODUCT.md, System events): in the catalogue so a
/// tenant can subscribe to them, but only Herald publishes them.
pub const SYSTEM: &[(&str, &str)] = &[
    (
        WEBHOOK_FAILING,
        "A webhook became failing: its endpoint failed and is being probed",
    ),
    (WEBHOOK_RECOVERED, "A failing webhook's probe succeeded"),
    (
        WEBHOOK_DISABLED,
        "A webhook was disabled (failing probes, 410 Gone, or by a call)",
    ),
    (
        DELIVERY_EXHAUSTED,
        "A delivery's retry schedule ran out without success",
    ),
];

/// Whether `name` is one of Herald's own event types.
pub fn is_system(name: &str) -> bool {
    SYSTEM.iter().any(|(n, _)| *n == name)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventType {
    pub name: String,
    pub description: String,
    /// Published by Herald itself, never by a producer.
    pub system: bool,
}

#[derive(Debug, Clone)]
pub struct Catalogue {
    types: Vec<EventType>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a valid event type")]
pub struct CatalogueError(pub String);

impl Default for Catalogue {
    fn default() -> Self {
        let types = DEFAULT
            .iter()
            .map(|(name, description)| (name, description, false))
            .chain(
                SYSTEM
                    .iter()
                    .map(|(name, description)| (name, description, true)),
            )
            .map(|(name, description, system)| EventType {
                name: (*name).into(),
                description: (*description).into(),
                system,
            })
            .collect();
        Self { types }
    }
}

impl Catalogue {
    /// The default catalogue plus `extra`, a comma-separated list of types.
    pub fn with_extra(extra: &str) -> Result<Self, CatalogueError> {
        let mut catalogue = Self::default();
        for name in extra.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if !valid_event_type(name) {
                return Err(CatalogueError(name.to_owned()));
            }
            if !catalogue.contains(name) {
                catalogue.types.push(EventType {
                    name: name.to_owned(),
                    description: "Operator-defined event type".into(),
                    system: false,
                });
            }
        }
        Ok(catalogue)
    }

    pub fn types(&self) -> &[EventType] {
        &self.types
    }

    pub fn contains(&self, name: &str) -> bool {
        self.types.iter().any(|t| t.name == name)
    }

    /// Whether a subscription pattern (exact, `*` or `>`) selects at least one
    /// catalogue type: a pattern that can never match is a tenant's mistake.
    pub fn pattern_selects_any(&self, pattern: &str) -> bool {
        self.types
            .iter()
            .any(|t| matching::type_matches(pattern, &t.name))
    }
}
