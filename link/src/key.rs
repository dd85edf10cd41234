//! The pre-shared key both ends of a replication link hold.
//!
//! A key file is 64 hexadecimal digits (32 random bytes) and a newline, readable by its owner
//! only: like an SSH private key, a key others can read is refused rather than used, since
//! anyone holding it can impersonate a primary (and replace the replica) or a backup (and
//! stop the protected VM). `twin keygen FILE` writes one.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Bytes of a key.
pub const KEY_LEN: usize = 32;

/// A pre-shared key. Its bytes are never printed: `Debug` shows a fingerprint-free marker.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; KEY_LEN]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(…)")
    }
}

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write key file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} is readable by others (mode {mode:04o}): anyone who reads it can \
         impersonate a primary or a backup; `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "key file {path} is not a key: expected {} hexadecimal digits (32 bytes) on one line, \
         as `twin keygen` writes",
        KEY_LEN * 2
    )]
    Format { path: PathBuf },
    #[error("cannot generate a key: the system's random source failed: {0}")]
    Random(String),
}

impl Key {
    /// A fresh random key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, KeyError> {
        let mut k = [0u8; KEY_LEN];
        getrandom::fill(&mut k).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Key(k))
    }

    /// The key's bytes (for the Noise handshake).
    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A key from its hex text (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let t = text.trim();
        if t.len() != KEY_LEN * 2 || !t.is_ascii() {
            return None;
        }
        let mut k = [0u8; KEY_LEN];
        for (i, byte) in k.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Key(k))
    }

    fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads a key file, refusing one that others can read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let read = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        // A key is 65 bytes; refuse to read a large file into memory to find that out.
        if meta.len() > 4096 {
            return Err(KeyError::Format {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Key::from_hex(&text).ok_or_else(|| KeyError::Format {
            path: path.to_path_buf(),
        })
    }

    /// Writes this key to a new file readable by its owner only; an existing file is never
    /// overwritten (it may be the key a running pair uses).
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let write = |source| KeyError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(write)?;
        // The umask cannot widen 0600, but a pre-set ACL default could: say it plainly.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(write)?;
        writeln!(f, "{}", self.to_hex()).map_err(write)?;
        f.sync_all().map_err(write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("twin-key-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn generated_key_round_trips_through_a_private_file() {
        let p = tmp("roundtrip");
        let k = Key::generate().unwrap();
        k.write_new(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Key::load(&p).unwrap(), k);
        // Never overwritten.
        assert!(matches!(
            Key::generate().unwrap().write_new(&p),
            Err(KeyError::Write { .. })
        ));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn readable_by_others_or_malformed_is_refused() {
        let p = tmp("perm");
        Key::generate().unwrap().write_new(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Key::load(&p).unwrap_err();
        assert!(
            matches!(e, KeyError::Permissions { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::remove_file(&p).unwrap();

        let p = tmp("format");
        std::fs::write(&p, "not a key\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(Key::load(&p), Err(KeyError::Format { .. })));
        std::fs::write(&p, "ab".repeat(31)).unwrap();
        assert!(matches!(Key::load(&p), Err(KeyError::Format { .. })));
        std::fs::remove_file(&p).unwrap();

        assert!(matches!(
            Key::load(Path::new("/nonexistent/twin.key")),
            Err(KeyError::Read { .. })
        ));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = Key::from_hex(&"5a".repeat(32)).unwrap();
        assert_eq!(format!("{k:?}"), "Key(…)");
    }
}
