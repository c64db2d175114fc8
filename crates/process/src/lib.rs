//! Process plumbing shared by the nicwarden controller and agent: reading a TOML config
//! file with errors that name the file and key, an exclusive lock on a data directory, and
//! waiting for Ctrl-C or SIGTERM.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// A config file that cannot be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse config {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Reads a TOML file into `T`; unknown keys and wrong types are errors naming the key
/// (when `T` denies unknown fields).
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigFileError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The data directory is held by another process, or its lock file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another {what} is already running with data directory {}", dir.display())]
    Held { what: String, dir: PathBuf },
    #[error("lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Takes an exclusive lock on `dir/<what>.lock` for as long as the returned file lives.
/// `what` names the kind of process in the error ("controller", "agent").
pub fn lock_data_dir(dir: &Path, what: &str) -> Result<std::fs::File, LockError> {
    let path = dir.join(format!("{what}.lock"));
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(LockError::Held {
            what: what.to_string(),
            dir: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cfg {
        port: u16,
    }

    #[test]
    fn toml_errors_name_file_and_key() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("c.toml");
        std::fs::write(&p, "port = \"x\"\n").expect("write");
        let e = read_toml::<Cfg>(&p).expect_err("bad type").to_string();
        assert!(e.contains("c.toml") && e.contains("port"), "{e}");
        std::fs::write(&p, "prot = 1\n").expect("write");
        let e = read_toml::<Cfg>(&p).expect_err("unknown key").to_string();
        assert!(e.contains("prot"), "{e}");
        let e = read_toml::<Cfg>(&d.path().join("missing.toml"))
            .expect_err("missing")
            .to_string();
        assert!(e.starts_with("read config"), "{e}");
    }

    #[test]
    fn second_lock_on_a_directory_is_refused_until_released() {
        let d = tempfile::tempdir().expect("tempdir");
        let first = lock_data_dir(d.path(), "agent").expect("first lock");
        let e = lock_data_dir(d.path(), "agent").expect_err("held");
        assert!(e.to_string().contains("another agent"), "{e}");
        drop(first);
        lock_data_dir(d.path(), "agent").expect("free again");
    }
}
