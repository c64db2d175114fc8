//! Helpers shared by the unit tests of both backends.

use crate::{Change, Datapath, DesiredState};

/// The changes, rendered.
pub(crate) fn strings(changes: &[Change]) -> Vec<String> {
    changes.iter().map(|c| c.to_string()).collect()
}

/// Reconciles `dp` to `desired`; the changes, rendered.
#[track_caller]
pub(crate) fn apply(dp: &mut impl Datapath, desired: &DesiredState) -> Vec<String> {
    match dp.reconcile(desired) {
        Ok(c) => strings(&c),
        Err(e) => panic!("reconcile failed: {e}"),
    }
}
