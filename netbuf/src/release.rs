//! An output thread that writes released frames to the wire (the TAP device).

use crate::buffer::NetBuffer;
use std::io;
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::warn;

/// What an output thread did, returned when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReleaseReport {
    /// Frames written successfully.
    pub written: u64,
    /// Frames whose write failed (they are dropped: the guest's TCP retransmits).
    pub write_errors: u64,
}

/// A running output thread; see [`NetBuffer::spawn_release_thread`].
#[derive(Debug)]
pub struct ReleaseThread {
    handle: JoinHandle<ReleaseReport>,
}

impl ReleaseThread {
    /// Wait for the thread to end, which it does once the buffer is closed and drained.
    /// `Err` carries the panic of the write callback, if it panicked.
    pub fn join(self) -> std::thread::Result<ReleaseReport> {
        self.handle.join()
    }
}

impl NetBuffer {
    /// Spawn a thread that takes released frames in order and passes each to `write` (e.g. a
    /// write to the TAP fd). A failed write is logged (first one and every 1000th) and the
    /// frame dropped; the thread ends once the buffer is [closed](NetBuffer::close) and
    /// drained.
    pub fn spawn_release_thread<F>(&self, name: &str, mut write: F) -> io::Result<ReleaseThread>
    where
        F: FnMut(&[u8]) -> io::Result<()> + Send + 'static,
    {
        let buffer = self.clone();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut report = ReleaseReport::default();
                // The timeout only bounds how long a missed wakeup could last.
                while let Ok(frames) = buffer.wait_released(Duration::from_millis(100)) {
                    for f in frames {
                        match write(&f.frame) {
                            Ok(()) => report.written += 1,
                            Err(error) => {
                                if report.write_errors % 1000 == 0 {
                                    warn!(%error, errors = report.write_errors + 1, "output write failed, frame dropped");
                                }
                                report.write_errors += 1;
                            }
                        }
                    }
                }
                report
            })?;
        Ok(ReleaseThread { handle })
    }
}
