//! The operator-visible event log: numbered, bounded, filterable.
//!
//! Ids increase by one per event, so a client that remembers the last id it saw can ask for
//! exactly what it missed; if the log has already dropped some of those, [`EventLog::since`]
//! says so and the client reloads. The shell starts the ids of each process life at a value
//! above the last life's (see [`EventLog::starting_at`]), so ids never repeat across restarts
//! either and a client resuming from before a restart is told to reload.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: u64,
    /// Unix ms.
    pub t: u64,
    /// Dotted kind: `lease.granted`, `agent.disconnected`, ...
    pub kind: String,
    pub severity: Severity,
    pub node: Option<String>,
    pub lease_id: Option<u64>,
    pub scope: Option<String>,
    pub message: String,
}

/// Which events a reader wants.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    /// Kind prefix: `lease` matches `lease.granted`, `lease.revoked`, ...
    pub kind: Option<String>,
    pub node: Option<String>,
    pub min_severity: Option<Severity>,
}

impl EventFilter {
    pub fn matches(&self, e: &Event) -> bool {
        let sev = |s: Severity| match s {
            Severity::Info => 0,
            Severity::Warning => 1,
            Severity::Critical => 2,
        };
        self.kind.as_deref().is_none_or(|k| {
            e.kind == k
                || e.kind
                    .strip_prefix(k)
                    .is_some_and(|rest| rest.starts_with('.') || k.ends_with('.'))
        }) && self
            .node
            .as_deref()
            .is_none_or(|n| e.node.as_deref() == Some(n))
            && self.min_severity.is_none_or(|m| sev(e.severity) >= sev(m))
    }
}

/// What [`EventLog::since`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Since {
    pub events: Vec<Event>,
    /// The newest id in the log (0 if empty): resume from here.
    pub last_id: u64,
    /// The id this process life started at: a client whose last id is below it has
    /// missed a controller restart.
    pub first_id: u64,
    /// Events after the requested id were already dropped from the log.
    pub gap: bool,
}

#[derive(Debug)]
pub struct EventLog {
    ring: VecDeque<Event>,
    capacity: usize,
    next_id: u64,
    /// The id of this life's first event.
    first_id: u64,
}

impl EventLog {
    pub fn new(capacity: usize) -> EventLog {
        Self::starting_at(capacity, 1)
    }

    /// A log whose first event gets id `first_id` (at least 1).
    pub fn starting_at(capacity: usize, first_id: u64) -> EventLog {
        EventLog {
            ring: VecDeque::with_capacity(capacity.max(1)),
            capacity: capacity.max(1),
            next_id: first_id.max(1),
            first_id: first_id.max(1),
        }
    }

    /// Appends an event, numbering it; the oldest is dropped once the log is full.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        t: u64,
        kind: &str,
        severity: Severity,
        node: Option<&str>,
        lease_id: Option<u64>,
        scope: Option<&str>,
        message: String,
    ) -> Event {
        let e = Event {
            id: self.next_id,
            t,
            kind: kind.to_string(),
            severity,
            node: node.map(str::to_string),
            lease_id,
            scope: scope.map(str::to_string),
            message,
        };
        self.next_id += 1;
        if self.ring.len() == self.capacity {
            self.ring.pop_front();
        }
        self.ring.push_back(e.clone());
        e
    }

    /// The newest id handed out (one less than the first id while the log is empty).
    pub fn last_id(&self) -> u64 {
        self.next_id - 1
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// The newest `limit` events with id > `after` that match, oldest first.
    pub fn since(&self, after: u64, limit: usize, filter: &EventFilter) -> Since {
        let oldest = self.ring.front().map(|e| e.id).unwrap_or(self.next_id);
        let gap = if after == 0 {
            // A client with no history: only events this life already dropped are missing.
            oldest > self.first_id
        } else if after + 1 < self.first_id || after > self.last_id() {
            // An id of another life (before a restart): the client's view is stale.
            true
        } else {
            after + 1 < oldest
        };
        // Ids are contiguous, so the first event after `after` is at a known index.
        let start = (after + 1).saturating_sub(oldest) as usize;
        let mut events: Vec<Event> = self
            .ring
            .iter()
            .skip(start)
            .rev()
            .filter(|e| filter.matches(e))
            .take(limit)
            .cloned()
            .collect();
        events.reverse();
        Since {
            events,
            last_id: self.last_id(),
            first_id: self.first_id,
            gap,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(log: &mut EventLog, kind: &str, node: &str) -> Event {
        log.push(1, kind, Severity::Info, Some(node), None, None, kind.into())
    }

    #[test]
    fn ids_are_contiguous_and_since_resumes() {
        let mut log = EventLog::new(10);
        for i in 0..5 {
            push(&mut log, "lease.granted", &format!("n{i}"));
        }
        let s = log.since(2, 100, &EventFilter::default());
        assert_eq!(
            s.events.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(s.last_id, 5);
        assert!(!s.gap);
        assert!(log.since(5, 100, &EventFilter::default()).events.is_empty());
    }

    #[test]
    fn bounded_and_reports_the_gap() {
        let mut log = EventLog::new(3);
        for _ in 0..10 {
            push(&mut log, "agent.connected", "n");
        }
        assert_eq!(log.len(), 3);
        let s = log.since(0, 100, &EventFilter::default());
        assert!(s.gap, "events 1..7 were dropped");
        assert_eq!(
            s.events.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![8, 9, 10]
        );
        assert!(!log.since(7, 100, &EventFilter::default()).gap);
        // An id beyond the newest comes from before a restart: reload.
        assert!(log.since(11, 100, &EventFilter::default()).gap);
        assert!(!log.since(10, 100, &EventFilter::default()).gap);
    }

    #[test]
    fn a_later_life_starting_higher_tells_old_clients_to_reload() {
        let mut log = EventLog::starting_at(10, 5_000);
        assert_eq!(log.last_id(), 4_999);
        // A client of the previous life saw up to id 37.
        let s = log.since(37, 100, &EventFilter::default());
        assert!(s.gap && s.events.is_empty(), "{s:?}");
        // Nothing stored yet: a client at the current head is up to date.
        assert!(!log.since(4_999, 100, &EventFilter::default()).gap);
        assert!(!log.since(0, 100, &EventFilter::default()).gap);
        push(&mut log, "lease.granted", "n");
        let s = log.since(37, 100, &EventFilter::default());
        assert!(s.gap);
        assert_eq!(
            s.events.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![5_000]
        );
    }

    #[test]
    fn limit_keeps_the_newest() {
        let mut log = EventLog::new(10);
        for _ in 0..6 {
            push(&mut log, "x.y", "n");
        }
        let s = log.since(0, 2, &EventFilter::default());
        assert_eq!(
            s.events.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![5, 6]
        );
    }

    #[test]
    fn filters_by_kind_prefix_node_and_severity() {
        let mut log = EventLog::new(10);
        push(&mut log, "lease.granted", "a");
        push(&mut log, "lease.revoked", "b");
        push(&mut log, "leases.other", "a");
        log.push(
            2,
            "agent.disconnected",
            Severity::Warning,
            Some("a"),
            None,
            None,
            "gone".into(),
        );
        let kinds = |f: EventFilter| {
            log.since(0, 100, &f)
                .events
                .into_iter()
                .map(|e| e.kind)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            kinds(EventFilter {
                kind: Some("lease".into()),
                ..Default::default()
            }),
            vec!["lease.granted", "lease.revoked"]
        );
        assert_eq!(
            kinds(EventFilter {
                kind: Some("lease.revoked".into()),
                ..Default::default()
            }),
            vec!["lease.revoked"]
        );
        assert_eq!(
            kinds(EventFilter {
                node: Some("a".into()),
                ..Default::default()
            }),
            vec!["lease.granted", "leases.other", "agent.disconnected"]
        );
        assert_eq!(
            kinds(EventFilter {
                min_severity: Some(Severity::Warning),
                ..Default::default()
            }),
            vec!["agent.disconnected"]
        );
    }
}
