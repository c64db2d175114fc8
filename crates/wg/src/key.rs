//! The node's WireGuard private key, in memory and on disk.

use crate::error::WgError;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand::RngCore as _;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// Key files must have exactly this mode.
const KEY_FILE_MODE: u32 = 0o600;

/// A WireGuard (x25519) private key. The bytes live in a buffer that is zeroized on drop;
/// `Debug` shows only the public key.
///
/// On disk: the 32 bytes base64-encoded, then a newline (the format of `wg genkey`), in a file
/// of mode 0600.
pub struct StaticKey {
    bytes: Zeroizing<[u8; 32]>,
}

impl StaticKey {
    /// A fresh key from the OS random number generator.
    pub fn generate() -> StaticKey {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut *bytes);
        StaticKey { bytes }
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.secret()).to_bytes()
    }

    /// The key as gotatun takes it; the `StaticSecret` zeroizes itself on drop.
    pub(crate) fn secret(&self) -> StaticSecret {
        StaticSecret::from(*self.bytes)
    }

    /// Reads a key file. Refuses a file whose permission bits are not exactly 0600 and one that
    /// does not hold exactly 32 base64-encoded bytes.
    pub fn load(path: &Path) -> Result<StaticKey, WgError> {
        const OP: &str = "load WireGuard key";
        let io = |source| WgError::Io {
            op: format!("{OP} {}", path.display()),
            source,
        };
        let bad = |reason: String| WgError::Key {
            op: OP,
            path: path.to_path_buf(),
            reason,
        };
        let mut file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(bad("not a regular file".to_string()));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode != KEY_FILE_MODE {
            return Err(bad(format!(
                "mode {mode:04o} is not 0600 (a private key must be readable by its owner only: chmod 600 it)"
            )));
        }
        // A valid file is 45 bytes; read a little more to recognise longer ones.
        let mut text = Zeroizing::new(Vec::with_capacity(64));
        (&mut file).take(256).read_to_end(&mut text).map_err(io)?;
        let encoded = text.trim_ascii();
        let decoded = Zeroizing::new(
            BASE64
                .decode(encoded)
                .map_err(|e| bad(format!("not base64: {e}")))?,
        );
        let mut bytes = Zeroizing::new([0u8; 32]);
        if decoded.len() != bytes.len() {
            return Err(bad(format!(
                "holds {} bytes, a WireGuard private key is 32",
                decoded.len()
            )));
        }
        bytes.copy_from_slice(&decoded);
        Ok(StaticKey { bytes })
    }

    /// Writes the key to `path` (mode 0600) atomically: a temporary file in the same
    /// directory is written, fsynced and renamed over `path`, then the directory is fsynced.
    pub fn save(&self, path: &Path) -> Result<(), WgError> {
        let op = format!("save WireGuard key {}", path.display());
        let io = |source| WgError::Io {
            op: op.clone(),
            source,
        };
        let (dir, name) = split(path).map_err(io)?;
        let tmp = dir.join(format!(
            ".{}.tmp.{}.{:08x}",
            name.to_string_lossy(),
            std::process::id(),
            rand::rngs::OsRng.next_u32()
        ));
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(KEY_FILE_MODE)
                .open(&tmp)?;
            // The umask may have cleared bits of the creation mode: set it exactly.
            file.set_permissions(std::fs::Permissions::from_mode(KEY_FILE_MODE))?;
            let mut text = Zeroizing::new(BASE64.encode(*self.bytes));
            text.push('\n');
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        sync_dir(&dir).map_err(io)
    }

    /// Destroys a key file: overwrites its bytes with zeros, fsyncs, removes it and fsyncs
    /// the directory. `Ok` if there is no such file. (On copy-on-write or journaling file
    /// systems the old blocks may survive; this is best effort against casual recovery.)
    pub fn wipe(path: &Path) -> Result<(), WgError> {
        let op = format!("wipe WireGuard key {}", path.display());
        let io = |source| WgError::Io {
            op: op.clone(),
            source,
        };
        let mut file = match OpenOptions::new().write(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        let len = file.metadata().map_err(io)?.len();
        let zeros = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX).min(1 << 20)];
        file.write_all(&zeros).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::remove_file(path).map_err(io)?;
        let (dir, _) = split(path).map_err(io)?;
        sync_dir(&dir).map_err(io)
    }
}

impl fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKey")
            .field("public", &BASE64.encode(self.public()))
            .finish_non_exhaustive()
    }
}

/// `path`'s directory (`.` for a bare name) and file name.
fn split(path: &Path) -> std::io::Result<(PathBuf, &std::ffi::OsStr)> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name")
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn save_load_roundtrip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg.key");
        let key = StaticKey::generate();
        key.save(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n') && text.len() == 45, "{text:?}");
        let loaded = StaticKey::load(&path).unwrap();
        assert_eq!(loaded.public(), key.public());
        assert_eq!(*loaded.bytes, *key.bytes);
        // Saving again replaces the file; no temporary file is left behind.
        StaticKey::generate().save(&path).unwrap();
        assert_ne!(StaticKey::load(&path).unwrap().public(), key.public());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn load_refuses_other_modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg.key");
        StaticKey::generate().save(&path).unwrap();
        for bad in [0o644, 0o640, 0o400, 0o700] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bad)).unwrap();
            let err = StaticKey::load(&path).unwrap_err().to_string();
            assert!(
                err.contains(&format!("mode {bad:04o} is not 0600")),
                "{err}"
            );
            assert!(err.contains("load WireGuard key"), "{err}");
        }
    }

    #[test]
    fn load_refuses_wrong_length_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let check = |name: &str, content: &str, want: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let err = StaticKey::load(&path).unwrap_err().to_string();
            assert!(err.contains(want), "{name}: {err}");
        };
        check(
            "short",
            &format!("{}\n", BASE64.encode([7u8; 16])),
            "holds 16 bytes",
        );
        check(
            "long",
            &format!("{}\n", BASE64.encode([7u8; 33])),
            "holds 33 bytes",
        );
        check("garbage", "not a key!\n", "not base64");
        check("empty", "", "holds 0 bytes");
    }

    #[test]
    fn load_accepts_wg_genkey_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("genkey");
        let bytes = [42u8; 32];
        std::fs::write(&path, format!("{}\n", BASE64.encode(bytes))).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let key = StaticKey::load(&path).unwrap();
        assert_eq!(*key.bytes, bytes);
        assert_eq!(
            key.public(),
            PublicKey::from(&StaticSecret::from(bytes)).to_bytes()
        );
    }

    #[test]
    fn wipe_removes_the_file_and_tolerates_absence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg.key");
        StaticKey::generate().save(&path).unwrap();
        StaticKey::wipe(&path).unwrap();
        assert!(!path.exists());
        StaticKey::wipe(&path).unwrap();
        let err = StaticKey::load(&path).unwrap_err().to_string();
        assert!(err.starts_with("load WireGuard key "), "{err}");
    }

    #[test]
    fn debug_does_not_print_the_private_key() {
        let key = StaticKey::generate();
        let shown = format!("{key:?}");
        assert!(!shown.contains(&BASE64.encode(*key.bytes)), "{shown}");
        assert!(shown.contains(&BASE64.encode(key.public())), "{shown}");
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(
            StaticKey::generate().public(),
            StaticKey::generate().public()
        );
    }
}
