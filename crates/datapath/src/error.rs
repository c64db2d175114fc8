//! The one error type of the datapath.

use std::io;

/// What went wrong while reading or programming the kernel. Every variant names the operation
/// and the object it was about.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// A tool ran and failed (non-zero exit).
    #[error("{op}: `{command}` failed ({}): {}", exit_text(*.status), stderr.trim())]
    Command {
        /// What we were doing, e.g. "apply tc batch on fab0 (command 3 of 9: `class add ...`)".
        op: String,
        /// The command line that failed.
        command: String,
        /// Its standard error.
        stderr: String,
        /// Its exit code (`None` if it was killed by a signal).
        status: Option<i32>,
    },
    /// A tool could not be started at all.
    #[error("spawn `{command}`: {source}{hint}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
        /// An install hint when the program is missing (empty otherwise).
        hint: String,
    },
    /// The kernel (or a tool) printed something we could not understand.
    #[error("parse {what}: {detail}")]
    Parse { what: String, detail: String },
    /// The desired state cannot be enforced as given (nothing was changed).
    #[error("invalid desired state: {0}")]
    Invalid(String),
    /// The host cannot run this backend (not root, tools missing).
    #[error("datapath unavailable: {0}")]
    Unavailable(String),
    /// A bpf syscall, a netlink request for the eBPF program, or a bpf filesystem operation
    /// failed.
    #[error("{op}: {detail}")]
    Bpf {
        /// What we were doing and on what, e.g. "attach tc egress program nw_egress on fab0".
        op: String,
        /// The error and its causes, outermost first, joined by ": ".
        detail: String,
    },
}

fn exit_text(status: Option<i32>) -> String {
    match status {
        Some(code) => format!("exit status {code}"),
        None => "killed by a signal".to_string(),
    }
}

impl DatapathError {
    /// A [`DatapathError::Bpf`] for `op`, with the whole cause chain of `err`.
    pub(crate) fn bpf(op: impl Into<String>, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut detail = err.to_string();
        let mut source = err.source();
        while let Some(e) = source {
            let text = e.to_string();
            // Some errors repeat their cause in their own text.
            if !detail.contains(&text) {
                detail.push_str(": ");
                detail.push_str(&text);
            }
            source = e.source();
        }
        DatapathError::Bpf {
            op: op.into(),
            detail,
        }
    }

    pub(crate) fn parse(what: impl Into<String>, detail: impl Into<String>) -> Self {
        DatapathError::Parse {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// A spawn failure, with an install hint naming the package when the program is missing.
    pub(crate) fn spawn(program: &str, command: String, source: io::Error) -> Self {
        let hint = if source.kind() == io::ErrorKind::NotFound {
            match program {
                "nft" => " (is nftables installed? apt-get install nftables)".to_string(),
                "tc" | "ip" => " (is iproute2 installed? apt-get install iproute2)".to_string(),
                other => format!(" (is `{other}` installed and on PATH?)"),
            }
        } else {
            String::new()
        };
        DatapathError::Spawn {
            command,
            source,
            hint,
        }
    }
}
