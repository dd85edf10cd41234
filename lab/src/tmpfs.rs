//! A small tmpfs mounted for one test: a filesystem that fills up (disk-full scenarios).

use std::path::{Path, PathBuf};

use crate::cmd::run_ok;
use crate::error::{HarnessError, Result};

/// A tmpfs of a given size mounted at a path (created if needed); lazily unmounted on drop,
/// also when the test panics.
///
/// Mount it before starting the process that is to write to it: [`crate::TwinProcess`]
/// starts processes with `ip netns exec`, which gives each one a copy of the mount table as
/// it is then (later mounts do not propagate into it).
#[derive(Debug)]
pub struct TinyFs {
    path: PathBuf,
}

impl TinyFs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it, e.g. `256k`) at `path`.
    pub fn mount(path: PathBuf, size: &str) -> Result<TinyFs> {
        std::fs::create_dir_all(&path)
            .map_err(|e| HarnessError::io(format!("creating mount point {}", path.display()), e))?;
        let target = path.to_string_lossy().into_owned();
        run_ok(
            None,
            &[
                "mount",
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                &target,
            ],
            None,
        )?;
        Ok(TinyFs { path })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let target = self.path.to_string_lossy().into_owned();
        // Lazy: a process of the test may still have a file open on it.
        let _ = run_ok(None, &["umount", "-l", &target], None);
    }
}
