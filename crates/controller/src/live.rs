//! The controller's live side: telemetry history, the event log, the per-minute store, and
//! the fan-out to event-stream subscribers.
//!
//! Telemetry and events each sit behind their own lock, taken after (never before) the
//! ledger's: ingesting a report never waits on a lease operation's store commit.
//! Subscribers get frames through a broadcast channel; one that falls too far behind is
//! told to resynchronise rather than slowing anyone else down.

use nicwarden_store::TelemetryDb;
use nicwarden_telemetry::{EventFilter, EventLog, Severity, Telemetry, TelemetryConfig};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::broadcast;

/// Events kept in memory for replay.
pub const EVENT_LOG_CAPACITY: usize = 20_000;
/// Frames a slow subscriber may fall behind before it is told to resync.
const SUBSCRIBER_BACKLOG: usize = 4096;

/// A frame of the live stream, serialised once for every subscriber.
#[derive(Debug)]
pub enum Frame {
    Event { id: u64, json: String },
    Tick { json: String },
}

pub struct Live {
    tele: Mutex<Telemetry>,
    events: Mutex<EventLog>,
    tx: broadcast::Sender<Arc<Frame>>,
    /// Set once the controller stops: open event streams end (an HTTP server drains its
    /// connections before it exits, and a stream never ends by itself).
    closing: tokio::sync::watch::Sender<bool>,
    db: TelemetryDb,
    /// How long per-minute rows are kept.
    pub minute_retention_ms: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Live {
    pub fn new(cfg: TelemetryConfig, db: TelemetryDb, minute_retention_ms: u64) -> Live {
        let (tx, _) = broadcast::channel(SUBSCRIBER_BACKLOG);
        Live {
            tele: Mutex::new(Telemetry::new(cfg)),
            // Ids of this life start above any of an earlier life's (1,000 a millisecond of
            // uptime before they could meet), so a client resuming across a restart is told
            // to reload instead of silently missing events. 1.8e15 today: exact in JSON
            // numbers (2^53).
            events: Mutex::new(EventLog::starting_at(
                EVENT_LOG_CAPACITY,
                crate::core::now_ms().saturating_mul(1000),
            )),
            tx,
            closing: tokio::sync::watch::Sender::new(false),
            db,
            minute_retention_ms,
        }
    }

    /// Ends every open event stream, and every one opened later (shutdown).
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Completes once [`Live::close_streams`] was called.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closing.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    pub fn telemetry(&self) -> MutexGuard<'_, Telemetry> {
        lock(&self.tele)
    }

    pub fn db(&self) -> &TelemetryDb {
        &self.db
    }

    /// Records an event and sends it to every subscriber.
    pub fn event(
        &self,
        kind: &str,
        severity: Severity,
        node: Option<&str>,
        lease_id: Option<u64>,
        scope: Option<&str>,
        message: String,
    ) {
        let mut log = lock(&self.events);
        let e = log.push(
            crate::core::now_ms(),
            kind,
            severity,
            node,
            lease_id,
            scope,
            message,
        );
        // Sent under the log's lock, so subscribers see ids in order.
        if self.tx.receiver_count() > 0 {
            if let Ok(json) = serde_json::to_string(&e) {
                let _ = self.tx.send(Arc::new(Frame::Event { id: e.id, json }));
            }
        }
    }

    /// Events after `after` that match, at most `limit`, plus the newest id and whether some
    /// were already dropped.
    pub fn events_since(
        &self,
        after: u64,
        limit: usize,
        filter: &EventFilter,
    ) -> nicwarden_telemetry::events::Since {
        lock(&self.events).since(after, limit, filter)
    }

    /// Subscribes to live frames and returns, atomically with it, the stored events after
    /// `after` (so nothing falls between the backlog and the live frames).
    pub fn subscribe(
        &self,
        after: u64,
    ) -> (
        nicwarden_telemetry::events::Since,
        broadcast::Receiver<Arc<Frame>>,
    ) {
        let log = lock(&self.events);
        let rx = self.tx.subscribe();
        (
            log.since(after, EVENT_LOG_CAPACITY, &EventFilter::default()),
            rx,
        )
    }

    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Sends a tick frame (already serialised) if anyone listens.
    pub fn send_tick(&self, json: String) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(Frame::Tick { json }));
        }
    }

    /// Writes closed minutes to the store and prunes what is past retention.
    pub fn flush_minutes(&self, now_ms: u64) -> Result<usize, nicwarden_store::StoreError> {
        let minutes = self.telemetry().take_minutes(now_ms);
        self.db.write(&minutes)?;
        Ok(minutes.len())
    }

    pub fn prune(&self, now_ms: u64) -> Result<usize, nicwarden_store::StoreError> {
        self.telemetry().gc(now_ms);
        self.db
            .prune(now_ms.saturating_sub(self.minute_retention_ms))
    }
}
