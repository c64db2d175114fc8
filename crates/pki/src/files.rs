//! File helpers: atomic writes with fixed modes, and reading private files that refuse loose
//! permissions.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rand::RngCore;
use zeroize::Zeroizing;

use crate::PkiError;

/// Mode of private files (keys).
pub const PRIVATE_MODE: u32 = 0o600;
/// Mode of public files (certificates).
pub const PUBLIC_MODE: u32 = 0o644;

/// Writes `bytes` to `path` atomically with mode 0600: a temporary file is created in the same
/// directory with mode 0600 from the start, written, fsynced and renamed over `path`; the
/// directory is then fsynced so the rename is durable.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_atomic(path, bytes, PRIVATE_MODE)
}

/// Like [`write_private`] but with mode 0644, for certificates.
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_atomic(path, bytes, PUBLIC_MODE)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    const OP: &str = "write file";
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| PkiError::corrupt(OP, path, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:016x}",
        name.to_string_lossy(),
        std::process::id(),
        rand::rngs::OsRng.next_u64()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| PkiError::io("create temporary file", &tmp, e))?;
        // The umask may have removed bits we want (never added any); set the mode exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| PkiError::io("set mode of temporary file", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| PkiError::io("write temporary file", &tmp, e))?;
        f.sync_all()
            .map_err(|e| PkiError::io("fsync temporary file", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| PkiError::io("rename temporary file to", path, e))
    })();
    if result.is_err() {
        // Best effort: the temporary file may not exist.
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Make the rename durable. Opening a directory read-only and fsyncing it is the POSIX way.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| PkiError::io("fsync directory", dir, e))
}

/// Creates `dir` (and parents) with mode 0700 if it does not exist.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), PkiError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| PkiError::io("create data directory", dir, e))
}

/// Reads a private file, refusing it if its mode grants any access to group or others.
pub(crate) fn read_private(op: &'static str, path: &Path) -> Result<Zeroizing<Vec<u8>>, PkiError> {
    let mut f = File::open(path).map_err(|e| PkiError::io(op, path, e))?;
    let meta = f.metadata().map_err(|e| PkiError::io(op, path, e))?;
    if !meta.is_file() {
        return Err(PkiError::corrupt(op, path, "not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        let who = if mode & 0o004 != 0 {
            "readable by others"
        } else if mode & 0o040 != 0 {
            "readable by group"
        } else {
            "accessible by group or others"
        };
        return Err(PkiError::InsecureMode {
            op,
            path: path.to_path_buf(),
            mode,
            who,
        });
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
    f.read_to_end(&mut buf)
        .map_err(|e| PkiError::io(op, path, e))?;
    Ok(buf)
}

/// Reads a public file (certificate) as UTF-8 text.
pub(crate) fn read_public(op: &'static str, path: &Path) -> Result<String, PkiError> {
    let bytes = fs::read(path).map_err(|e| PkiError::io(op, path, e))?;
    String::from_utf8(bytes).map_err(|_| PkiError::corrupt(op, path, "not UTF-8 PEM text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn write_private_sets_0600_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_private(&p, b"one").unwrap();
        assert_eq!(mode_of(&p), 0o600);
        // An existing file with a loose mode is replaced by a 0600 file.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&p, b"two").unwrap();
        assert_eq!(mode_of(&p), 0o600);
        assert_eq!(fs::read(&p).unwrap(), b"two");
        // No temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_private_into_missing_dir_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing").join("k");
        let err = write_private(&p, b"x").unwrap_err().to_string();
        assert!(err.contains("create temporary file"), "{err}");
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn read_private_refuses_loose_modes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.key");
        write_private(&p, b"secret").unwrap();
        assert_eq!(&read_private("load CA key", &p).unwrap()[..], b"secret");
        for (mode, who) in [
            (0o644, "readable by others"),
            (0o640, "readable by group"),
            (0o620, "accessible by group or others"),
        ] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let err = read_private("load CA key", &p).unwrap_err().to_string();
            let want = format!(
                "load CA key {}: mode {mode:04o} is {who}; chmod 600",
                p.display()
            );
            assert_eq!(err, want);
        }
    }

    #[test]
    fn read_private_missing_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope.key");
        let err = read_private("load server key", &p).unwrap_err().to_string();
        assert!(err.starts_with("load server key "), "{err}");
        assert!(err.contains("nope.key"), "{err}");
    }
}
