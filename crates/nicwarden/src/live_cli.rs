//! `nicwarden events` and `nicwarden top`: the operator's live views, over the same API as
//! the dashboard.
//!
//! - `events` lists `GET /v1/events`; with `--follow` it then reads the server-sent event
//!   stream (`GET /v1/events/stream?since_id=<last>`) with its own parser ([`sse`]), prints
//!   each new event that matches the filters, re-reads `/v1/events` when the server says
//!   `resync`, and reconnects with backoff from the last id it saw when the connection
//!   drops.
//! - `top` draws `GET /v1/telemetry/fleet` as a table, redrawn in place every interval on
//!   a terminal (in the alternate screen, restored on exit), or once.
//!
//! Rendering is pure (`render_events`, [`render_top`]) and tested beside the code; the
//! I/O loops are tested end to end in `tests/it/live_cli.rs`.

mod localtime;
mod sse;

use anyhow::Context as _;
use nicwarden_controller::api_types::{FleetView, NodeNow};
use serde::Deserialize;
use std::cmp::Ordering;
use std::fmt;
use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use crate::cli::{EventsArgs, TopArgs, TopSort};
use crate::client::{encode, root_cause, ApiError, Client};
use crate::table::Table;
use crate::units::{fmt_bytes, fmt_millis, fmt_rate};
pub use localtime::Zone;
use sse::SseParser;

/// The most events `GET /v1/events` returns at once (the controller's log capacity).
const MAX_EVENTS: u64 = 20_000;
/// Reconnection backoff of `events --follow`: 1 s, doubling, at most 10 s.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The controller sends a keep-alive every 15 s (and ticks every second): a stream silent
/// for this long is dead even if TCP has not noticed.
const STREAM_IDLE: Duration = Duration::from_secs(45);

/// Standard output went away (`nicwarden events -f | head`): stop quietly.
#[derive(Debug)]
struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes and flushes `text` to stdout; a closed pipe is [`StdoutClosed`].
fn write_out(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("write to standard output")),
    }
}

/// A closed stdout ends the command successfully.
fn quiet_on_closed_stdout(r: anyhow::Result<()>) -> anyhow::Result<()> {
    match r {
        Err(e) if e.is::<StdoutClosed>() => Ok(()),
        r => r,
    }
}

/// Control characters (an operator's revocation reason is free text) would drive the
/// reader's terminal: show them escaped.
fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// events

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// An event as the API sends it (the controller's `nicwarden_telemetry::Event`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
struct EventRow {
    id: u64,
    /// Unix ms.
    t: u64,
    kind: String,
    severity: String,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    message: String,
}

/// An event, and its JSON as received (printed as is with `--json`).
#[derive(Clone, Debug, PartialEq)]
struct Event {
    row: EventRow,
    raw: serde_json::Value,
}

impl Event {
    fn from_json(raw: serde_json::Value) -> Result<Event, serde_json::Error> {
        Ok(Event {
            row: serde_json::from_value(raw.clone())?,
            raw,
        })
    }
}

/// `--kind`, `--node`, `--severity`: sent to `/v1/events` as query parameters, and applied
/// here to the stream, which carries every event. Same rules as the controller's.
#[derive(Clone, Debug, Default)]
struct EventFilter {
    /// A kind, or a prefix of dotted kinds: `lease` matches `lease.granted`.
    kind: Option<String>,
    node: Option<String>,
    min_severity: Option<Severity>,
}

impl EventFilter {
    fn from_args(a: &EventsArgs) -> EventFilter {
        EventFilter {
            kind: a.kind.clone().filter(|k| !k.is_empty()),
            node: a.node.clone().filter(|n| !n.is_empty()),
            min_severity: a.severity.as_deref().and_then(Severity::parse),
        }
    }

    fn matches(&self, e: &EventRow) -> bool {
        let kind = self.kind.as_deref().is_none_or(|k| {
            e.kind == k
                || e.kind
                    .strip_prefix(k)
                    .is_some_and(|rest| rest.starts_with('.') || k.ends_with('.'))
        });
        let node = self
            .node
            .as_deref()
            .is_none_or(|n| e.node.as_deref() == Some(n));
        // A severity this client does not know (a newer controller) is shown.
        let severity = self
            .min_severity
            .is_none_or(|m| Severity::parse(&e.severity).is_none_or(|s| s >= m));
        kind && node && severity
    }

    /// `/v1/events?...` for events after `since_id`.
    fn list_path(&self, since_id: u64, limit: Option<u64>) -> String {
        let mut q = vec![format!("since_id={since_id}")];
        if let Some(l) = limit {
            q.push(format!("limit={l}"));
        }
        if let Some(k) = &self.kind {
            q.push(format!("kind={}", encode(k)));
        }
        if let Some(n) = &self.node {
            q.push(format!("node={}", encode(n)));
        }
        if let Some(s) = self.min_severity {
            let s = match s {
                Severity::Info => "info",
                Severity::Warning => "warning",
                Severity::Critical => "critical",
            };
            q.push(format!("severity={s}"));
        }
        format!("/v1/events?{}", q.join("&"))
    }
}

/// `GET /v1/events`, decoded.
struct EventList {
    events: Vec<Event>,
    last_id: u64,
    first_id: u64,
    gap: bool,
}

async fn list_events(client: &Client, path: &str) -> anyhow::Result<EventList> {
    #[derive(Deserialize)]
    struct Raw {
        events: Vec<serde_json::Value>,
        last_id: u64,
        #[serde(default)]
        first_id: u64,
        #[serde(default)]
        gap: bool,
    }
    let (raw, _): (Raw, _) = client.get(path).await?;
    let events = raw
        .events
        .into_iter()
        .map(Event::from_json)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("decode the events of GET {path}"))?;
    Ok(EventList {
        events,
        last_id: raw.last_id,
        first_id: raw.first_id,
        gap: raw.gap,
    })
}

/// Prints events as a table whose columns are sized on the first batch (later rows are
/// padded the same, wider cells push their line out), or as JSON lines.
struct EventPrinter {
    json: bool,
    zone: Zone,
    kind_width: usize,
    node_width: usize,
    header_done: bool,
}

const EVENT_HEADERS: [&str; 5] = ["TIME", "SEVERITY", "KIND", "NODE", "MESSAGE"];

impl EventPrinter {
    /// `follow`: leave room for the kinds and node names still to come.
    fn new(json: bool, zone: Zone, follow: bool) -> EventPrinter {
        let (kind_width, node_width) = if follow { (18, 10) } else { (0, 0) };
        EventPrinter {
            json,
            zone,
            kind_width: kind_width.max(EVENT_HEADERS[2].len()),
            node_width: node_width.max(EVENT_HEADERS[3].len()),
            header_done: false,
        }
    }

    fn line(&self, cells: [&str; 5]) -> String {
        let widths = [8, 8, self.kind_width, self.node_width, 0];
        let mut line = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = w.saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        let mut line = line.trim_end().to_string();
        line.push('\n');
        line
    }

    /// The text for a batch: the table header first, once.
    fn render(&mut self, events: &[Event]) -> String {
        let mut out = String::new();
        if self.json {
            for e in events {
                out.push_str(&e.raw.to_string());
                out.push('\n');
            }
            return out;
        }
        let node = |e: &Event| clean(e.row.node.as_deref().unwrap_or("-"));
        if !self.header_done {
            for e in events {
                self.kind_width = self.kind_width.max(clean(&e.row.kind).chars().count());
                self.node_width = self.node_width.max(node(e).chars().count());
            }
            out.push_str(&self.line(EVENT_HEADERS));
            self.header_done = true;
        }
        for e in events {
            let r = &e.row;
            out.push_str(&self.line([
                &self.zone.hms(r.t),
                &clean(&r.severity),
                &clean(&r.kind),
                &node(e),
                &clean(&r.message),
            ]));
        }
        out
    }
}

/// `nicwarden events`.
pub async fn events(args: EventsArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client)?;
    let filter = EventFilter::from_args(&args);
    let mut printer = EventPrinter::new(args.client.json, Zone::from_env(), args.follow);
    let since = args.since_id.unwrap_or(0);
    let first = list_events(&client, &filter.list_path(since, args.limit)).await?;
    if args.since_id.is_some() && first.gap {
        if since > first.last_id || since < first.first_id.saturating_sub(1) {
            eprintln!(
                "note: event {since} is from an earlier run of the controller (this run's \
                 events start at {}); `nicwarden audit` has the durable record",
                first.first_id
            );
        } else {
            eprintln!(
                "note: some events after {since} were already dropped from the controller's \
                 memory (the audit log keeps the durable record: `nicwarden audit`)"
            );
        }
    }
    let r = write_out(&printer.render(&first.events));
    if r.is_err() || !args.follow {
        return quiet_on_closed_stdout(r);
    }
    let mut follow = Follow {
        client: &client,
        filter,
        printer,
        cursor: first.last_id,
    };
    let r = tokio::select! {
        r = follow.run() => r,
        r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C"),
    };
    quiet_on_closed_stdout(r)
}

/// `events --follow` after the first listing.
struct Follow<'a> {
    client: &'a Client,
    filter: EventFilter,
    printer: EventPrinter,
    /// The newest event id seen (printed or filtered out): the stream resumes after it.
    cursor: u64,
}

/// Why a stream connection ended.
enum Ended {
    /// Dropped, closed or silent: reconnect after the backoff.
    Dropped(String),
    /// The controller restarted under this connection, which was opened at an event id of
    /// its previous run: the server would skip new events up to that id, so reopen from
    /// the new cursor at once.
    Reopen,
}

/// Errors a retry cannot fix: a wrong token, a refused request.
fn is_fatal(e: &ApiError) -> bool {
    matches!(e, ApiError::Status { status, .. } if status.is_client_error())
}

/// The first line of an error (connection errors carry advice on further lines).
fn first_line(e: &impl fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

impl Follow<'_> {
    /// Until Ctrl-C (the caller's), a fatal error, or stdout closing.
    async fn run(&mut self) -> anyhow::Result<()> {
        let mut backoff = BACKOFF_MIN;
        let mut reconnecting = false;
        loop {
            let path = format!("/v1/events/stream?since_id={}", self.cursor);
            match self.client.open_stream(&path).await {
                Ok(resp) => {
                    if reconnecting {
                        eprintln!(
                            "events: reconnected to {}; resuming after event {}",
                            self.client.base(),
                            self.cursor
                        );
                    }
                    backoff = BACKOFF_MIN;
                    let Ended::Dropped(why) = self.read(resp).await? else {
                        reconnecting = false;
                        continue;
                    };
                    eprintln!(
                        "events: the event stream from {} {why}; reconnecting in {} s, \
                         resuming after event {}",
                        self.client.base(),
                        backoff.as_secs(),
                        self.cursor
                    );
                }
                Err(e) if is_fatal(&e) => return Err(e.into()),
                Err(e) => eprintln!(
                    "events: {}; retrying in {} s",
                    first_line(&e),
                    backoff.as_secs()
                ),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            reconnecting = true;
        }
    }

    /// Reads one connection's frames; returns why it ended.
    async fn read(&mut self, mut resp: reqwest::Response) -> anyhow::Result<Ended> {
        let mut parser = SseParser::new(&["tick"]);
        let mut frames = Vec::new();
        let mut oversized = 0;
        loop {
            let chunk = match tokio::time::timeout(STREAM_IDLE, resp.chunk()).await {
                Err(_) => {
                    return Ok(Ended::Dropped(format!(
                        "sent nothing for {} s (not even a keep-alive)",
                        STREAM_IDLE.as_secs()
                    )))
                }
                Ok(Err(e)) => return Ok(Ended::Dropped(format!("dropped ({})", root_cause(&e)))),
                Ok(Ok(None)) => {
                    return Ok(Ended::Dropped("ended (the controller closed it)".into()))
                }
                Ok(Ok(Some(chunk))) => chunk,
            };
            parser.feed(&chunk, &mut frames);
            if parser.oversized_lines > oversized {
                oversized = parser.oversized_lines;
                eprintln!(
                    "events: skipped a line of the event stream longer than {} MiB",
                    sse::MAX_LINE >> 20
                );
            }
            for f in std::mem::take(&mut frames) {
                if let Some(end) = self.frame(f).await? {
                    return Ok(end);
                }
            }
        }
    }

    /// Handles a frame; `Some` to end this connection.
    async fn frame(&mut self, f: sse::Frame) -> anyhow::Result<Option<Ended>> {
        match f.event.as_str() {
            "event" => {
                let e = match serde_json::from_str(&f.data).map(Event::from_json) {
                    Ok(Ok(e)) => e,
                    Ok(Err(err)) | Err(err) => {
                        eprintln!("events: skipped an event the controller sent that this client cannot read ({err})");
                        return Ok(None);
                    }
                };
                // Already printed (the stream replays from the id it was opened with, and
                // a resync may have read ahead of it).
                if e.row.id <= self.cursor {
                    return Ok(None);
                }
                self.cursor = e.row.id;
                if self.filter.matches(&e.row) {
                    write_out(&self.printer.render(std::slice::from_ref(&e)))?;
                }
                Ok(None)
            }
            "resync" => self.resync().await,
            _ => Ok(None), // `tick` (never delivered: ignored by the parser), and new kinds
        }
    }

    /// The server skipped events (this client fell behind, or its id is from before a
    /// controller restart): re-read what was missed.
    async fn resync(&mut self) -> anyhow::Result<Option<Ended>> {
        let path = self.filter.list_path(self.cursor, Some(MAX_EVENTS));
        let mut list = match list_events(self.client, &path).await {
            Ok(l) => l,
            Err(e) => {
                if let Some(api) = e.downcast_ref::<ApiError>() {
                    if is_fatal(api) {
                        return Err(e);
                    }
                }
                return Ok(Some(Ended::Dropped(format!(
                    "asked for a resync, and re-reading the events failed ({})",
                    first_line(&format!("{e:#}"))
                ))));
            }
        };
        let restarted = list.last_id < self.cursor || self.cursor < list.first_id.saturating_sub(1);
        if restarted {
            eprintln!(
                "events: the controller has restarted; showing its events from the start \
                 (events of its previous run: `nicwarden audit`)"
            );
            let path = self.filter.list_path(0, Some(MAX_EVENTS));
            list = match list_events(self.client, &path).await {
                Ok(l) => l,
                Err(e) => {
                    return Ok(Some(Ended::Dropped(format!(
                        "restarted, and re-reading its events failed ({})",
                        first_line(&format!("{e:#}"))
                    ))))
                }
            };
        } else if list.gap {
            eprintln!(
                "events: some events after {} were dropped from the controller's memory \
                 before this client read them (`nicwarden audit` has the durable record)",
                self.cursor
            );
        }
        write_out(&self.printer.render(&list.events))?;
        self.cursor = list.last_id;
        Ok(restarted.then_some(Ended::Reopen))
    }
}

// ---------------------------------------------------------------------------------------
// top

/// What `top` shows of the fleet.
#[derive(Clone, Debug)]
pub struct TopOptions {
    pub sort: TopSort,
    /// Lowercase; matched against name, group and state.
    pub filter: Option<String>,
    pub stale_only: bool,
}

impl TopOptions {
    fn from_args(a: &TopArgs) -> TopOptions {
        TopOptions {
            sort: a.sort,
            filter: a
                .filter
                .as_deref()
                .map(str::to_lowercase)
                .filter(|f| !f.is_empty()),
            stale_only: a.stale,
        }
    }

    fn keeps(&self, n: &NodeNow) -> bool {
        (!self.stale_only || n.stale)
            && self.filter.as_deref().is_none_or(|f| {
                [&n.node, &n.group, &n.state]
                    .iter()
                    .any(|s| s.to_lowercase().contains(f))
            })
    }
}

/// Milliseconds since the node's last report, on the controller's clock.
fn report_age(n: &NodeNow, now_ms: u64) -> Option<u64> {
    n.last_report_unix_ms.map(|t| now_ms.saturating_sub(t))
}

/// The order of `--sort`; ties by name.
fn compare(sort: TopSort, now_ms: u64, a: &NodeNow, b: &NodeNow) -> Ordering {
    let by = match sort {
        TopSort::Node => Ordering::Equal,
        TopSort::State => a.state.cmp(&b.state),
        // Highest first.
        TopSort::Rate => b.rate_bps.total_cmp(&a.rate_bps),
        TopSort::Leased => b.leased_bps.cmp(&a.leased_bps),
        // Soonest first; nodes without a lease last.
        TopSort::Expiry => match (a.expires_in_ms, b.expires_in_ms) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        },
        // Oldest report first; never reported before everything.
        TopSort::Age => match (report_age(a, now_ms), report_age(b, now_ms)) {
            (Some(x), Some(y)) => y.cmp(&x),
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        },
    };
    by.then_with(|| a.node.cmp(&b.node))
}

/// The nodes to show, in order, at most `max` of them (the first `max` in sort order,
/// selected in linear time and only those sorted); and how many matched.
fn select<'a>(
    fleet: &'a FleetView,
    opts: &TopOptions,
    max: Option<usize>,
) -> (Vec<&'a NodeNow>, usize) {
    let mut rows: Vec<&NodeNow> = fleet.nodes.iter().filter(|n| opts.keeps(n)).collect();
    let matched = rows.len();
    let cmp = |a: &&NodeNow, b: &&NodeNow| compare(opts.sort, fleet.now_unix_ms, a, b);
    if let Some(max) = max.filter(|&m| m < rows.len()) {
        if max == 0 {
            rows.clear();
        } else {
            rows.select_nth_unstable_by(max - 1, cmp);
            rows.truncate(max);
        }
    }
    rows.sort_by(cmp);
    (rows, matched)
}

fn state_cell(n: &NodeNow) -> String {
    let state = clean(&n.state);
    match (n.stale, n.connected) {
        (false, _) => state,
        (true, true) => format!("{state} STALE"),
        (true, false) => format!("{state} STALE (offline)"),
    }
}

fn volume_cell(n: &NodeNow) -> String {
    match n.volume_bytes {
        Some(v) => format!("{} / {}", fmt_bytes(n.used_bytes), fmt_bytes(v)),
        None if n.leased_bps > 0 => {
            let used: u64 = n
                .scopes
                .iter()
                .filter(|s| s.lease_id.is_some())
                .map(|s| s.bytes)
                .sum();
            format!("{} / unlimited", fmt_bytes(used))
        }
        None => "-".into(),
    }
}

fn measured_cell(n: &NodeNow) -> String {
    let rate = if n.rate_bps.is_finite() && n.rate_bps > 0.0 {
        n.rate_bps.round() as u64
    } else {
        0
    };
    if n.leased_bps > 0 {
        let pct = rate as f64 * 100.0 / n.leased_bps as f64;
        format!("{} ({pct:.0}%)", fmt_rate(rate))
    } else {
        fmt_rate(rate)
    }
}

/// `top`'s frame: a header with the counts, the table, and how many rows did not fit.
/// `max_rows`: table rows that fit (live view); `None` prints every matching node.
pub fn render_top(
    fleet: &FleetView,
    api: &str,
    opts: &TopOptions,
    zone: &Zone,
    max_rows: Option<usize>,
    error: Option<&str>,
) -> String {
    let active = fleet
        .nodes
        .iter()
        .filter(|n| n.state == "active" || n.state == "partial")
        .count();
    let stale = fleet.nodes.iter().filter(|n| n.stale).count();
    let mut out = format!(
        "nicwarden top  {api}  {}  nodes {}  active {active}  stale {stale}\n",
        zone.hms(fleet.now_unix_ms),
        fleet.nodes.len(),
    );
    let (rows, matched) = select(fleet, opts, max_rows);
    let mut view = format!("sort: {}", opts.sort);
    if let Some(f) = &opts.filter {
        view.push_str(&format!("  filter: \"{}\"", clean(f)));
    }
    if opts.stale_only {
        view.push_str("  stale only");
    }
    if opts.filter.is_some() || opts.stale_only {
        view.push_str(&format!("  matching: {matched}"));
    }
    out.push_str(&view);
    out.push('\n');
    if let Some(e) = error {
        out.push_str(&format!(
            "! update failed, showing the last data: {}\n",
            clean(e)
        ));
    }
    out.push('\n');
    let mut t = Table::new(&[
        "NODE",
        "GROUP",
        "STATE",
        "LEASED",
        "MEASURED",
        "VOLUME",
        "EXPIRES IN",
        "LAST REPORT",
    ]);
    for n in &rows {
        t.row(vec![
            clean(&n.node),
            clean(&n.group),
            state_cell(n),
            if n.leased_bps > 0 {
                fmt_rate(n.leased_bps)
            } else {
                "-".into()
            },
            measured_cell(n),
            volume_cell(n),
            n.expires_in_ms.map_or_else(|| "-".into(), fmt_millis),
            report_age(n, fleet.now_unix_ms)
                .map_or_else(|| "never".into(), |a| format!("{} ago", fmt_millis(a))),
        ]);
    }
    out.push_str(&t.render());
    if matched == 0 {
        out.push_str(if fleet.nodes.is_empty() {
            "(no nodes: add one with `nicwarden node add`)\n"
        } else {
            "(no node matches)\n"
        });
    } else if rows.len() < matched {
        out.push_str(&format!(
            "... {} more (narrow with --filter or --stale, or enlarge the terminal)\n",
            matched - rows.len()
        ));
    }
    out
}

/// Lines of `render_top` above the table rows: header, view, blank, table header; plus
/// the error line and the "more" line.
const TOP_CHROME_LINES: usize = 6;

/// The terminal's (rows, columns): `stty size` on /dev/tty, else `$LINES`/`$COLUMNS`,
/// else 24x80.
fn terminal_size() -> (usize, usize) {
    let stty = std::fs::File::open("/dev/tty").ok().and_then(|tty| {
        std::process::Command::new("stty")
            .arg("size")
            .stdin(tty)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
    });
    let parse = |s: &str| {
        let mut it = s.split_whitespace().map(|v| v.parse::<usize>().ok());
        match (it.next().flatten(), it.next().flatten()) {
            (Some(r), Some(c)) if r > 0 && c > 0 => Some((r, c)),
            _ => None,
        }
    };
    if let Some(size) = stty
        .filter(|o| o.status.success())
        .and_then(|o| parse(&String::from_utf8_lossy(&o.stdout)))
    {
        return size;
    }
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse().ok());
    (env("LINES").unwrap_or(24), env("COLUMNS").unwrap_or(80))
}

/// The alternate screen with the cursor hidden, for as long as this lives (also through a
/// panic or an error return).
struct Screen;

impl Screen {
    fn enter() -> anyhow::Result<Screen> {
        write_out("\x1b[?1049h\x1b[?25l")?;
        Ok(Screen)
    }

    /// Draws `text` from the top-left corner, each line cut to `cols` and cleared to its
    /// end, at most `rows` lines (so the screen never scrolls), the rest cleared.
    fn draw(&self, text: &str, rows: usize, cols: usize) -> anyhow::Result<()> {
        let mut frame = String::from("\x1b[H");
        for (i, line) in text.lines().take(rows).enumerate() {
            if i > 0 {
                frame.push_str("\r\n");
            }
            frame.extend(line.chars().take(cols));
            frame.push_str("\x1b[K");
        }
        frame.push_str("\x1b[J");
        write_out(&frame)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let mut out = std::io::stdout();
        let _ = out.write_all(b"\x1b[?25h\x1b[?1049l");
        let _ = out.flush();
    }
}

/// Whether a failed fleet read ends `top` (a wrong token, a refused request) rather than
/// being shown and retried.
fn fatal_for_top(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ApiError>().is_some_and(is_fatal)
}

/// `nicwarden top`.
pub async fn top(args: TopArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client)?;
    let opts = TopOptions::from_args(&args);
    let zone = Zone::from_env();
    // The first read happens before the screen is taken over, so that a wrong address or
    // token is a plain error message.
    let (fleet, raw): (FleetView, _) = client.get("/v1/telemetry/fleet").await?;
    if args.client.json {
        let text = serde_json::to_string_pretty(&raw).context("format JSON")?;
        return quiet_on_closed_stdout(write_out(&format!("{text}\n")));
    }
    if args.once || !std::io::stdout().is_terminal() {
        let text = render_top(&fleet, client.base(), &opts, &zone, None, None);
        return quiet_on_closed_stdout(write_out(&text));
    }
    let screen = Screen::enter()?;
    let live = live_top(&client, &opts, &zone, args.interval, fleet, &screen);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listen for SIGTERM")?;
    let r = tokio::select! {
        r = live => r,
        r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C"),
        _ = term.recv() => Ok(()),
    };
    drop(screen);
    quiet_on_closed_stdout(r)
}

async fn live_top(
    client: &Client,
    opts: &TopOptions,
    zone: &Zone,
    interval: Duration,
    mut fleet: FleetView,
    screen: &Screen,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut resized = signal(SignalKind::window_change()).context("listen for SIGWINCH")?;
    let mut size = terminal_size();
    let mut error: Option<String> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is now: `fleet` is fresh
    loop {
        let (rows, cols) = size;
        let max_rows = rows.saturating_sub(TOP_CHROME_LINES).max(1);
        let text = render_top(
            &fleet,
            client.base(),
            opts,
            zone,
            Some(max_rows),
            error.as_deref(),
        );
        screen.draw(&text, rows, cols)?;
        tokio::select! {
            _ = tick.tick() => {
                match client.get::<FleetView>("/v1/telemetry/fleet").await {
                    Ok((f, _)) => {
                        fleet = f;
                        error = None;
                    }
                    Err(e) if fatal_for_top(&e) => return Err(e),
                    Err(e) => error = Some(first_line(&format!("{e:#}"))),
                }
            }
            _ = resized.recv() => size = terminal_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nicwarden_controller::api_types::ScopeNow;

    fn ev(id: u64, kind: &str, severity: &str, node: Option<&str>, message: &str) -> Event {
        let raw = serde_json::json!({
            "id": id, "t": 1_763_700_000_000u64 + id * 1000, "kind": kind,
            "severity": severity, "node": node, "lease_id": null, "scope": null,
            "message": message,
        });
        Event::from_json(raw).expect("valid event")
    }

    #[test]
    fn event_filters() {
        let f = |kind: Option<&str>, node: Option<&str>, sev: Option<Severity>| EventFilter {
            kind: kind.map(str::to_string),
            node: node.map(str::to_string),
            min_severity: sev,
        };
        let granted = ev(1, "lease.granted", "info", Some("n1"), "");
        let revoked = ev(2, "lease.revoked", "warning", Some("n2"), "");
        let leasex = ev(3, "leasex.other", "critical", None, "");
        let cases: &[(EventFilter, [bool; 3])] = &[
            (f(None, None, None), [true, true, true]),
            (f(Some("lease"), None, None), [true, true, false]),
            (f(Some("lease."), None, None), [true, true, false]),
            (f(Some("lease.revoked"), None, None), [false, true, false]),
            (f(Some("leas"), None, None), [false, false, false]),
            (f(None, Some("n1"), None), [true, false, false]),
            (f(None, None, Some(Severity::Warning)), [false, true, true]),
            (
                f(None, None, Some(Severity::Critical)),
                [false, false, true],
            ),
            (
                f(Some("lease"), Some("n2"), Some(Severity::Info)),
                [false, true, false],
            ),
        ];
        for (filter, want) in cases {
            let got = [&granted, &revoked, &leasex].map(|e| filter.matches(&e.row));
            assert_eq!(got, *want, "{filter:?}");
        }
        // An unknown severity passes a severity filter.
        let odd = ev(4, "x", "apocalyptic", None, "");
        assert!(f(None, None, Some(Severity::Critical)).matches(&odd.row));
    }

    #[test]
    fn event_list_paths() {
        let f = EventFilter {
            kind: Some("lease".into()),
            node: Some("node 1".into()),
            min_severity: Some(Severity::Warning),
        };
        assert_eq!(
            f.list_path(7, Some(50)),
            "/v1/events?since_id=7&limit=50&kind=lease&node=node%201&severity=warning"
        );
        assert_eq!(
            EventFilter::default().list_path(0, None),
            "/v1/events?since_id=0"
        );
    }

    #[test]
    fn event_table_then_streamed_rows() {
        let mut p = EventPrinter::new(false, Zone::utc(), false);
        let text = p.render(&[
            ev(
                1,
                "lease.granted",
                "info",
                Some("node-1"),
                "lease 1 granted",
            ),
            ev(2, "agent.connected", "info", None, "hello"),
        ]);
        assert_eq!(
            text,
            "TIME      SEVERITY  KIND             NODE    MESSAGE\n\
             04:40:01  info      lease.granted    node-1  lease 1 granted\n\
             04:40:02  info      agent.connected  -       hello\n"
        );
        // Later rows: no header again, same columns, wider cells push out.
        let text = p.render(&[ev(
            3,
            "lease.revoked",
            "warning",
            Some("a-long-node-name"),
            "bye\x1b[2J",
        )]);
        assert_eq!(
            text,
            "04:40:03  warning   lease.revoked    a-long-node-name  bye\\u{1b}[2J\n"
        );
        // An empty first batch still prints the header (follow mode leaves room).
        let mut p = EventPrinter::new(false, Zone::utc(), true);
        assert_eq!(
            p.render(&[]),
            "TIME      SEVERITY  KIND                NODE        MESSAGE\n"
        );
    }

    #[test]
    fn events_as_json_lines() {
        let mut p = EventPrinter::new(true, Zone::utc(), true);
        let e = ev(5, "lease.revoked", "warning", Some("n1"), "m");
        let text = p.render(&[e.clone(), e.clone()]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let back: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON line");
        assert_eq!(back, e.raw);
    }

    fn node(name: &str, state: &str, rate: f64, leased: u64) -> NodeNow {
        NodeNow {
            node: name.into(),
            group: "default".into(),
            connected: true,
            last_report_unix_ms: Some(NOW - 400),
            stale: false,
            state: state.into(),
            leased_bps: leased,
            floor_bps: 0,
            rate_bps: rate,
            volume_bytes: None,
            used_bytes: 0,
            expires_in_ms: (leased > 0).then_some(25_000),
            scopes: vec![ScopeNow {
                scope: "egress".into(),
                lease_id: (leased > 0).then_some(1),
                state: state.into(),
                leased_bps: leased,
                floor_bps: 0,
                rate_bps: rate,
                bytes: 12_500_000,
                packets: 1000,
                dropped_packets: 0,
                volume_bytes: None,
                used_bytes: 12_500_000,
                expires_in_ms: (leased > 0).then_some(25_000),
            }],
        }
    }

    const NOW: u64 = 1_763_720_000_000;

    fn fleet() -> FleetView {
        let mut b = node("node-b", "active", 50e6, 100_000_000);
        b.volume_bytes = Some(1_000_000_000);
        b.used_bytes = 250_000_000;
        b.expires_in_ms = Some(5_000);
        let mut c = node("node-c", "none", 0.0, 0);
        c.stale = true;
        c.connected = false;
        c.last_report_unix_ms = None;
        c.group = "rack-a".into();
        let mut a = node("node-a", "active", 199_999_999.6, 200_000_000);
        a.last_report_unix_ms = Some(NOW - 12_000);
        a.stale = true;
        FleetView {
            now_unix_ms: NOW,
            stale_after_ms: 5000,
            nodes: vec![b, c, a],
        }
    }

    fn opts(sort: TopSort, filter: Option<&str>, stale_only: bool) -> TopOptions {
        TopOptions {
            sort,
            filter: filter.map(str::to_string),
            stale_only,
        }
    }

    #[test]
    fn top_table() {
        let text = render_top(
            &fleet(),
            "http://127.0.0.1:7080",
            &opts(TopSort::Node, None, false),
            &Zone::utc(),
            None,
            None,
        );
        assert_eq!(
            text,
            "nicwarden top  http://127.0.0.1:7080  10:13:20  nodes 3  active 2  stale 2\n\
             sort: node\n\
             \n\
             NODE    GROUP    STATE                 LEASED      MEASURED           VOLUME               EXPIRES IN  LAST REPORT\n\
             node-a  default  active STALE          200 Mbit/s  200 Mbit/s (100%)  12.5 MB / unlimited  25s         12s ago\n\
             node-b  default  active                100 Mbit/s  50 Mbit/s (50%)    250 MB / 1 GB        5s          400ms ago\n\
             node-c  rack-a   none STALE (offline)  -           0 bit/s            -                    -           never\n"
        );
    }

    fn order(sort: TopSort, filter: Option<&str>, stale_only: bool) -> Vec<String> {
        let f = fleet();
        select(&f, &opts(sort, filter, stale_only), None)
            .0
            .iter()
            .map(|n| n.node.clone())
            .collect()
    }

    #[test]
    fn top_sort_and_filter() {
        let cases: &[(TopSort, Option<&str>, bool, &[&str])] = &[
            (TopSort::Node, None, false, &["node-a", "node-b", "node-c"]),
            (TopSort::State, None, false, &["node-a", "node-b", "node-c"]),
            (TopSort::Rate, None, false, &["node-a", "node-b", "node-c"]),
            (
                TopSort::Leased,
                None,
                false,
                &["node-a", "node-b", "node-c"],
            ),
            (
                TopSort::Expiry,
                None,
                false,
                &["node-b", "node-a", "node-c"],
            ),
            (TopSort::Age, None, false, &["node-c", "node-a", "node-b"]),
            (TopSort::Node, Some("rack"), false, &["node-c"]),
            (TopSort::Node, Some("active"), false, &["node-a", "node-b"]),
            (TopSort::Node, Some("NODE-B"), false, &["node-b"]),
            (TopSort::Node, None, true, &["node-a", "node-c"]),
            (TopSort::Node, Some("active"), true, &["node-a"]),
            (TopSort::Node, Some("nothing"), false, &[]),
        ];
        for (sort, filter, stale, want) in cases {
            let opts = TopOptions::from_args(&TopArgs {
                client: crate::cli::ClientOpts {
                    api: String::new(),
                    token: None,
                    token_file: None,
                    json: false,
                },
                sort: *sort,
                filter: filter.map(str::to_string),
                stale: *stale,
                once: true,
                interval: Duration::from_secs(1),
            });
            let f = fleet();
            let got: Vec<&str> = select(&f, &opts, None)
                .0
                .iter()
                .map(|n| n.node.as_str())
                .collect();
            assert_eq!(got, *want, "{sort:?} {filter:?} stale={stale}");
        }
        assert_eq!(order(TopSort::Rate, None, false)[0], "node-a");
    }

    #[test]
    fn top_shows_only_what_fits() {
        // 1,000 nodes, 5 rows: the first 5 in sort order, and how many are left.
        let nodes: Vec<NodeNow> = (0..1000)
            .map(|i| node(&format!("n{i:04}"), "active", f64::from(i), 1000))
            .collect();
        let f = FleetView {
            now_unix_ms: NOW,
            stale_after_ms: 5000,
            nodes,
        };
        let o = opts(TopSort::Rate, None, false);
        let (rows, matched) = select(&f, &o, Some(5));
        assert_eq!(matched, 1000);
        let names: Vec<&str> = rows.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(names, ["n0999", "n0998", "n0997", "n0996", "n0995"]);
        let text = render_top(
            &f,
            "http://h:1",
            &o,
            &Zone::utc(),
            Some(5),
            Some("timed out"),
        );
        assert!(text.contains("! update failed, showing the last data: timed out\n"));
        assert!(
            text.ends_with(
                "... 995 more (narrow with --filter or --stale, or enlarge the terminal)\n"
            ),
            "{text}"
        );
        assert_eq!(text.lines().count(), TOP_CHROME_LINES + 5, "{text}");
        let o = opts(TopSort::Node, Some("zzz"), true);
        let text = render_top(&f, "http://h:1", &o, &Zone::utc(), Some(5), None);
        assert!(
            text.contains("sort: node  filter: \"zzz\"  stale only  matching: 0\n"),
            "{text}"
        );
        assert!(text.ends_with("(no node matches)\n"), "{text}");
    }
}
