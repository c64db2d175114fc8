//! The kernel backend: only its availability check. A netlink backend is future work.

use crate::error::WgError;
use crate::sys;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

/// Why the kernel backend cannot be used here; never `Ok` until it is built.
///
/// If `/sys/module/wireguard` is missing, tries `ip link add <tmp> type wireguard` in the
/// calling thread's network namespace (which would load the module if it exists) and deletes
/// the link if that worked.
pub fn kernel_backend_status() -> Result<(), WgError> {
    const NOT_BUILT: &str = "kernel WireGuard is present but nicwarden's netlink backend is not built yet (future work); use backend \"gotatun\"";
    if Path::new("/sys/module/wireguard").exists() {
        return Err(WgError::Unavailable(NOT_BUILT.to_string()));
    }
    static PROBES: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "nwwgp{}x{}",
        std::process::id() % 100_000,
        PROBES.fetch_add(1, Ordering::Relaxed) % 1000
    );
    match sys::ip(&["link", "add", &name, "type", "wireguard"]) {
        Ok(_) => {
            if let Err(e) = sys::ip(&["link", "del", &name]) {
                tracing::warn!(error = %e, link = %name, "delete kernel WireGuard probe link");
            }
            Err(WgError::Unavailable(NOT_BUILT.to_string()))
        }
        Err(e) => Err(WgError::Unavailable(format!(
            "kernel WireGuard is not available on this kernel: /sys/module/wireguard does not exist and {e}; use backend \"gotatun\""
        ))),
    }
}
