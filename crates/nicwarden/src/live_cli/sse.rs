//! A server-sent events parser (the `text/event-stream` format of the WHATWG HTML standard,
//! section 9.2), fed the body's chunks as they arrive, wherever they split.
//!
//! Lines end in LF, CRLF or a lone CR (a CRLF split across two chunks is one line end);
//! `field: value` lines (one space after the colon is dropped) build a frame, `:` lines are
//! comments (keep-alives), a blank line ends the frame. `data` lines are joined with LF.
//! One difference from a browser: a frame is delivered when it had a `data` field *or* an
//! `event` field, so `event: resync` with no data still arrives.
//!
//! Frames of the types the reader ignores (`tick`: up to a whole fleet of JSON a second)
//! are not buffered: their `data` lines are skipped as they stream past. A line longer than
//! [`MAX_LINE`] is dropped and counted, so memory stays bounded whatever the server sends.

/// The longest line kept (an event is well under a kilobyte).
pub const MAX_LINE: usize = 16 << 20;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    /// The `event` field (`event`, `tick`, `resync`); empty when absent (a `message`).
    pub event: String,
    pub data: String,
    /// The frame's `id` field, if it had one.
    pub id: Option<String>,
}

#[derive(Debug)]
pub struct SseParser {
    /// The current line, when a chunk ended inside it.
    line: Vec<u8>,
    /// The last chunk ended in CR: an LF first thing in the next one belongs to it.
    after_cr: bool,
    /// Dropping the rest of the current line (an ignored frame's data, or too long).
    discarding: bool,
    /// No line completed yet (a byte-order mark may open the stream).
    first_line: bool,
    frame: Frame,
    has_data: bool,
    ignore: &'static [&'static str],
    /// Lines dropped for being longer than [`MAX_LINE`].
    pub oversized_lines: u64,
}

impl SseParser {
    /// A parser that skips the frames whose `event` is one of `ignore`.
    pub fn new(ignore: &'static [&'static str]) -> SseParser {
        SseParser {
            line: Vec::new(),
            after_cr: false,
            discarding: false,
            first_line: true,
            frame: Frame::default(),
            has_data: false,
            ignore,
            oversized_lines: 0,
        }
    }

    fn ignored(&self) -> bool {
        self.ignore.contains(&self.frame.event.as_str())
    }

    /// Parses a chunk; complete frames are appended to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<Frame>) {
        let mut rest = chunk;
        if self.after_cr {
            self.after_cr = false;
            if let Some(r) = rest.strip_prefix(b"\n") {
                rest = r;
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (head, tail) = rest.split_at(end);
            if self.discarding {
                self.discarding = false;
                self.line.clear();
            } else if self.line.is_empty() {
                self.line_done(head, out);
            } else {
                self.line.extend_from_slice(head);
                let line = std::mem::take(&mut self.line);
                self.line_done(&line, out);
                self.line = line;
                self.line.clear();
            }
            rest = &tail[1..];
            if tail[0] == b'\r' {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        if self.discarding || rest.is_empty() {
            return;
        }
        self.line.extend_from_slice(rest);
        // An ignored frame's data (its `event:` line came first) need not be kept.
        if self.line.len() >= 5 && self.line.starts_with(b"data:") && self.ignored() {
            self.line.clear();
            self.discarding = true;
        } else if self.line.len() > MAX_LINE {
            self.line = Vec::new();
            self.discarding = true;
            self.oversized_lines += 1;
        }
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<Frame>) {
        let mut line = line;
        if std::mem::take(&mut self.first_line) {
            line = line.strip_prefix("\u{feff}".as_bytes()).unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return; // a comment: keep-alive
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => self.frame.event = String::from_utf8_lossy(value).into_owned(),
            b"data" => {
                if self.ignored() {
                    return;
                }
                if self.has_data {
                    self.frame.data.push('\n');
                }
                self.frame.data.push_str(&String::from_utf8_lossy(value));
                self.has_data = true;
            }
            b"id" if !value.contains(&0) => {
                self.frame.id = Some(String::from_utf8_lossy(value).into_owned());
            }
            _ => {} // `retry` and unknown fields
        }
    }

    fn dispatch(&mut self, out: &mut Vec<Frame>) {
        let frame = std::mem::take(&mut self.frame);
        let has_data = std::mem::take(&mut self.has_data);
        if (has_data || !frame.event.is_empty()) && !self.ignore.contains(&frame.event.as_str()) {
            out.push(frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(event: &str, data: &str, id: Option<&str>) -> Frame {
        Frame {
            event: event.into(),
            data: data.into(),
            id: id.map(str::to_string),
        }
    }

    /// Parses `input` whole, and split at every position into two chunks, and one byte
    /// at a time: the frames must be the same every time.
    fn check(ignore: &'static [&'static str], input: &str, want: &[Frame]) {
        let bytes = input.as_bytes();
        let run = |chunks: &[&[u8]]| {
            let mut p = SseParser::new(ignore);
            let mut out = Vec::new();
            for c in chunks {
                p.feed(c, &mut out);
            }
            out
        };
        assert_eq!(run(&[bytes]), want, "whole: {input:?}");
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            assert_eq!(run(&[a, b]), want, "split at {i}: {input:?}");
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(run(&singles), want, "byte by byte: {input:?}");
    }

    #[test]
    fn frames() {
        const NONE: &[&str] = &[];
        // The controller's frames.
        check(
            NONE,
            "id: 7\nevent: event\ndata: {\"id\":7}\n\nevent: tick\ndata: {\"nodes\":[]}\n\n",
            &[
                frame("event", "{\"id\":7}", Some("7")),
                frame("tick", "{\"nodes\":[]}", None),
            ],
        );
        // CRLF and lone CR line ends.
        check(
            NONE,
            "event: resync\r\ndata: {}\r\n\r\nevent: event\rdata: x\r\r",
            &[frame("resync", "{}", None), frame("event", "x", None)],
        );
        // Comments (keep-alives) are skipped, also inside a frame.
        check(
            NONE,
            ": keep-alive\n\nevent: event\n: between\ndata: a\n\n",
            &[frame("event", "a", None)],
        );
        // Multi-line data is joined with LF; no space after the colon is fine; only one
        // space is removed.
        check(
            NONE,
            "data:one\ndata:  two\ndata\n\n",
            &[frame("", "one\n two\n", None)],
        );
        // An event name without data still arrives; a blank line alone is nothing.
        check(NONE, "\n\nevent: resync\n\n", &[frame("resync", "", None)]);
        // A frame without its blank line is not complete yet.
        check(NONE, "event: event\ndata: half", &[]);
        // Unknown fields and `retry` are ignored; an id with NUL is ignored.
        check(
            NONE,
            "retry: 1000\nfoo: bar\nid: a\0b\ndata: x\n\n",
            &[frame("", "x", None)],
        );
        // A byte-order mark may open the stream.
        check(
            NONE,
            "\u{feff}event: event\ndata: µ\n\n",
            &[frame("event", "µ", None)],
        );
    }

    #[test]
    fn ignored_frames_are_skipped() {
        const TICK: &[&str] = &["tick"];
        check(
            TICK,
            "event: tick\ndata: {\"nodes\":[1,2,3]}\n\nid: 8\nevent: event\ndata: e\n\n\
             event: tick\r\ndata: more\r\n\r\n",
            &[frame("event", "e", Some("8"))],
        );
    }

    #[test]
    fn an_ignored_frames_data_is_not_buffered() {
        let mut p = SseParser::new(&["tick"]);
        let mut out = Vec::new();
        p.feed(b"event: tick\ndata: ", &mut out);
        for _ in 0..1000 {
            p.feed(&[b'x'; 1000], &mut out);
            assert!(p.line.len() < 16, "buffered {} bytes", p.line.len());
        }
        p.feed(b"\n\nevent: event\ndata: y\n\n", &mut out);
        assert_eq!(out, vec![frame("event", "y", None)]);
    }

    #[test]
    fn oversized_lines_are_dropped() {
        let mut p = SseParser::new(&[]);
        let mut out = Vec::new();
        p.feed(b"event: event\ndata: ", &mut out);
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..17 {
            p.feed(&chunk, &mut out);
        }
        assert!(p.line.len() <= MAX_LINE + chunk.len());
        p.feed(b"\n\nevent: event\ndata: ok\n\n", &mut out);
        assert_eq!(p.oversized_lines, 1);
        // The frame whose data was dropped still arrives (by its name), empty.
        assert_eq!(
            out,
            vec![frame("event", "", None), frame("event", "ok", None)]
        );
    }
}
