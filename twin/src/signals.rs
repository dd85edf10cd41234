//! Termination signals (SIGINT, SIGTERM, SIGHUP), taken synchronously: blocked in every
//! thread and received by one `signals` thread (or polled for), never by an asynchronous
//! handler. What a signal does — stop the VM, raise a flag the demo's waits check — then
//! runs as ordinary code, and everything on the way out is dropped normally.
//!
//! One helper for every command: `twin run`/`restore`/`protect`/`backup` (the signal becomes
//! a VM event, or is polled by the backup's loop) and the lab's `demo` and `bench` (the
//! signal raises their `INTERRUPTED` flag).

use nix::sys::signal::{SigSet, Signal};

/// The signals that ask a process to stop.
pub const TERMINATION: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// Why the termination signals could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("blocking termination signals: {0}")]
    Block(#[source] nix::Error),
    #[error("spawning the signal thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("polling for a termination signal: {0}")]
    Poll(#[source] nix::Error),
}

/// The termination signals, blocked; whoever holds this takes them.
pub struct Termination {
    set: SigSet,
}

impl Termination {
    /// Blocks the termination signals in the calling thread, and so in every thread it
    /// spawns afterwards: call it before any other thread is spawned. They then stay pending
    /// until [`Termination::pending`] or the thread of [`Termination::forward`] takes them.
    /// Child processes start with an empty mask (`std::process` resets it).
    pub fn block() -> Result<Self, SignalError> {
        let mut set = SigSet::empty();
        for s in TERMINATION {
            set.add(s);
        }
        set.thread_block().map_err(SignalError::Block)?;
        Ok(Termination { set })
    }

    /// A termination signal pending for this process, taken without waiting.
    pub fn pending(&self) -> Result<Option<Signal>, SignalError> {
        let timeout = nix::sys::time::TimeSpec::new(0, 0);
        let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::uninit();
        // SAFETY: `set` is a valid sigset, `info` is writable storage for one siginfo_t, and
        // the zero timeout makes this a poll; the return value is checked.
        let r =
            unsafe { libc::sigtimedwait(self.set.as_ref(), info.as_mut_ptr(), timeout.as_ref()) };
        if r < 0 {
            let e = nix::errno::Errno::last();
            return if e == nix::errno::Errno::EAGAIN {
                Ok(None)
            } else {
                Err(SignalError::Poll(e))
            };
        }
        Ok(Signal::try_from(r).ok())
    }

    /// Spawns the `signals` thread, which takes each termination signal as it arrives and
    /// hands it to `on`; the thread ends when `on` returns `false`. It is not joined: it
    /// waits in `sigwait` for as long as the process wants its signals taken, holds nothing
    /// but `on`, and ends with the process.
    pub fn forward<F>(self, mut on: F) -> Result<(), SignalError>
    where
        F: FnMut(Signal) -> bool + Send + 'static,
    {
        let set = self.set;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                if let Ok(sig) = set.wait() {
                    if !on(sig) {
                        return;
                    }
                }
            })
            .map_err(SignalError::Spawn)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a thread of its own, so that the blocked mask and the raised signal stay there.
    #[test]
    fn a_blocked_signal_is_pending_until_taken() {
        std::thread::spawn(|| {
            let t = Termination::block().expect("block");
            assert_eq!(t.pending().expect("poll"), None);
            // SAFETY: `pthread_kill` to this very thread, with a signal it blocks: the
            // signal stays pending on the thread, nothing is delivered asynchronously.
            let r = unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGHUP) };
            assert_eq!(r, 0);
            assert_eq!(t.pending().expect("poll"), Some(Signal::SIGHUP));
            assert_eq!(t.pending().expect("poll"), None);
        })
        .join()
        .expect("the test thread");
    }
}
