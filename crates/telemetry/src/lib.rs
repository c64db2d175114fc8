//! Live telemetry, as a deterministic state machine with time passed in (no I/O, no clock).
//!
//! * [`Telemetry`] ingests agents' usage reports and keeps, per (node, scope) series, a
//!   fixed-size ring of 1-second points ([`ring::Ring`]): memory is allocated once per series
//!   and never grows, so the cost is `series x history_secs x` [`ring::POINT_BYTES`].
//!   It folds the points into per-minute aggregates ([`MinutePoint`]) that the shell writes to
//!   the store, and tracks which nodes changed (or went stale) since the last live tick.
//! * [`events::EventLog`] is the bounded, numbered log of operator-visible events that the
//!   live event stream replays and follows.
//!
//! The controller owns one of each behind its own lock (never the ledger's), so ingesting
//! 1,000 reports a second does not contend with lease operations.

pub mod events;
pub mod ring;
mod telemetry;

pub use events::{Event, EventFilter, EventLog, Severity};
pub use ring::{Point, Ring, ScopeState};
pub use telemetry::{
    Ingested, MinutePoint, ReportScope, ScopeLatest, SeriesKey, Telemetry, TelemetryConfig, Terms,
    UsageReport,
};
