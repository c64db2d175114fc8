//! The HTB shaping layer both backends share: reads what tc shows on the fabric interface and
//! brings it to a [`Plan`] (root qdisc, classes, leaves and, when the plan steers with u32
//! filters, the filters). The comparison itself is pure, in `tc.rs`; the tool runs are behind
//! [`TcOps`].

use crate::ops::TcOps;
use crate::plan::Plan;
use crate::tc::{self, Leaf, TcKernel};
use crate::{Change, DatapathError};
use std::collections::BTreeMap;

pub(crate) struct Shaper {
    dev: String,
    ops: Box<dyn TcOps>,
}

impl Shaper {
    pub(crate) fn new(dev: &str, ops: Box<dyn TcOps>) -> Self {
        Shaper {
            dev: dev.to_string(),
            ops,
        }
    }

    pub(crate) fn dev(&self) -> &str {
        &self.dev
    }

    /// What tc shows on the device (classes and filters only under our root).
    pub(crate) fn read(&mut self) -> Result<TcKernel, DatapathError> {
        let qdiscs = self.ops.qdiscs_json(&self.dev)?;
        let (root, _) = tc::parse_qdiscs(&qdiscs)?;
        // Classes and filters only matter under our root; skip two tool runs otherwise.
        if root.is_some_and(|r| r.kind == "htb" && r.handle == "1:") {
            let filters = self.ops.filters_json(&self.dev)?;
            let classes = self.ops.classes_text(&self.dev)?;
            TcKernel::parse(&qdiscs, &filters, &classes)
        } else {
            TcKernel::parse(&qdiscs, "[]", "")
        }
    }

    /// Brings tc to `plan`; `last` is the plan this process applied last, if any.
    pub(crate) fn reconcile(
        &mut self,
        plan: &Plan,
        last: Option<&Plan>,
    ) -> Result<Vec<Change>, DatapathError> {
        let kernel = self.read()?;
        let diff = tc::diff(plan, &kernel, last);
        if !diff.cmds.is_empty() {
            self.ops.batch(&diff.cmds)?;
        }
        Ok(diff.changes)
    }

    /// The leaf qdiscs under the classes of `1:`, by class minor (with their statistics).
    pub(crate) fn leaves(&mut self) -> Result<BTreeMap<u16, Leaf>, DatapathError> {
        let (_, leaves) = tc::parse_qdiscs(&self.ops.qdiscs_json(&self.dev)?)?;
        Ok(leaves)
    }

    /// Deletes our HTB root (and with it every class, leaf and filter under it), if present.
    pub(crate) fn remove(&mut self) -> Result<(), DatapathError> {
        let (root, _) = tc::parse_qdiscs(&self.ops.qdiscs_json(&self.dev)?)?;
        if root.is_some_and(|r| r.kind == "htb" && r.handle == "1:") {
            self.ops
                .batch(&[format!("qdisc del dev {} root", self.dev)])?;
        }
        Ok(())
    }
}
