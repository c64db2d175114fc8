//! The one place this crate runs an external program: iproute2's `ip`, for what neither
//! gotatun nor the `tun` crate can do (IPv6 addresses, the kernel WireGuard probe).

use crate::error::WgError;
use std::process::Command;

/// Runs `ip <args>` in the calling thread's network namespace (a child inherits it) and
/// returns its stdout.
pub(crate) fn ip(args: &[&str]) -> Result<String, WgError> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| WgError::Command {
            command: command.clone(),
            detail: format!("cannot run it: {e}"),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(WgError::Command {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}
