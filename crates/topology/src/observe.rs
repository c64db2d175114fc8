//! What agents observed: one [`PortRound`] per fabric port per probe interval.
//!
//! An agent sends a signed probe (its identity, the port, a fresh nonce) on each fabric port
//! every probe interval and collects what answers within the round. A neighbour node answers
//! with its own signed `{node, port, echoed nonce}`; a switch announces which of its ports
//! the prober is on (LLDP-like, unsigned: switches sign nothing). The agent checks what it
//! can (the signature against the identities the controller gave it, the nonce against the
//! ones it sent and has not seen answered) and reports each answer as one [`Heard`]; the
//! controller turns reports into rounds (stamping `at` with its own clock) for the verifier.
//!
//! Design:
//! - A round per port per interval, rather than one observation per answer, makes "nothing
//!   heard this round" explicit: a missing link is a declared neighbour absent from
//!   consecutive rounds, with no timers to guess at.
//! - Only [`Heard::Node`] and [`Heard::Switch`] are trusted as identities. The other
//!   variants carry what the answer *claimed*, for the operator and the finding's culprits,
//!   never as evidence that a link exists.

use crate::Endpoint;
use nicwarden_lease::{NodeId, Time};
use serde::{Deserialize, Serialize};

/// One answer to a probe.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Heard {
    /// A node answered with a valid signature over its identity and our fresh nonce.
    Node(Endpoint),
    /// A switch announced which of its ports we are on (LLDP-like; switches sign nothing).
    Switch(Endpoint),
    /// An answer without a signature.
    Unsigned { claimed: Option<Endpoint> },
    /// An answer whose signature does not verify against the claimed identity's key.
    BadSignature { claimed: Option<Endpoint> },
    /// A validly signed answer echoing a nonce that is not fresh (replayed or stale).
    Replayed { claimed: Option<Endpoint> },
    /// A signed answer by an identity the controller does not know.
    UnknownIdentity { claimed: Option<Endpoint> },
}

impl Heard {
    /// The trusted neighbour this answer proves, if it proves one.
    pub fn trusted(&self) -> Option<&Endpoint> {
        match self {
            Heard::Node(from) | Heard::Switch(from) => Some(from),
            _ => None,
        }
    }

    /// What the answer claimed to be (trusted or not).
    pub fn claimed(&self) -> Option<&Endpoint> {
        match self {
            Heard::Node(from) | Heard::Switch(from) => Some(from),
            Heard::Unsigned { claimed }
            | Heard::BadSignature { claimed }
            | Heard::Replayed { claimed }
            | Heard::UnknownIdentity { claimed } => claimed.as_ref(),
        }
    }

    /// Short words for details: "unsigned", "bad signature", ...
    pub fn label(&self) -> &'static str {
        match self {
            Heard::Node(_) => "node",
            Heard::Switch(_) => "switch",
            Heard::Unsigned { .. } => "unsigned",
            Heard::BadSignature { .. } => "bad signature",
            Heard::Replayed { .. } => "replayed nonce",
            Heard::UnknownIdentity { .. } => "unknown identity",
        }
    }
}

/// One answer heard in a round, with the measured round-trip time if the agent had one
/// (switch announcements are unsolicited and usually have none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub heard: Heard,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_us: Option<u64>,
}

/// One probing round of one port: everything heard in it (possibly nothing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRound {
    /// Who probed ...
    pub node: NodeId,
    /// ... on which of its ports.
    pub port: String,
    /// When the round ended, on the controller's clock.
    pub at: Time,
    #[serde(default)]
    pub heard: Vec<Answer>,
}

impl PortRound {
    /// The probing port as an endpoint.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.node.clone(), self.port.clone())
    }
}
