//! Thin wrappers around the few raw Linux calls the harness needs: `setns`, pidfds, `poll`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Moves the calling thread into the network namespace `fd` refers to.
pub(crate) fn setns_net(fd: RawFd) -> io::Result<()> {
    // SAFETY: `setns` takes an fd and a flag and touches no memory of ours; an invalid fd is
    // reported through the return value.
    let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits until `fd` is readable or `timeout` passes; `Ok(true)` if readable. Restarts after
/// `EINTR` with the time that is left.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Round up so that a sub-millisecond remainder still waits instead of spinning.
        let ms = i32::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid, exclusively borrowed pollfd and we pass a count of 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        match rc {
            0 => return Ok(false),
            n if n > 0 => return Ok(true),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

/// A pidfd: a handle on a process that cannot be confused with a later process that reuses the
/// pid, becomes readable when the process exits, and can be signalled without races.
#[derive(Debug)]
pub(crate) struct PidFd(OwnedFd);

impl PidFd {
    /// Opens a pidfd for `pid`, which must be a live (or not yet reaped) child.
    pub(crate) fn open(pid: u32) -> io::Result<Self> {
        let pid = libc::pid_t::try_from(pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
        // SAFETY: `pidfd_open(pid, 0)` takes two integers and returns a new fd or -1.
        let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(rc)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "pidfd out of range"))?;
        // SAFETY: the kernel just returned `fd` as a new descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Waits for the process to exit, at most `timeout`; `Ok(true)` if it has exited.
    pub(crate) fn wait_exited(&self, timeout: Duration) -> io::Result<bool> {
        poll_readable(self.0.as_fd(), timeout)
    }

    /// Sends `signal` to the process (an error `ESRCH` once it has been reaped).
    pub(crate) fn send_signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: `pidfd_send_signal(fd, sig, NULL, 0)`: a NULL siginfo is allowed and means
        // "as if by kill(2)"; no memory of ours is read or written.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Whether a process with this pid exists (it may belong to another user: `EPERM` counts).
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission; nothing is delivered.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether the current process runs as root.
pub(crate) fn is_root() -> bool {
    // SAFETY: `geteuid` cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// A memory cgroup (v1) for one process, removed on drop.
pub struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    pub fn new(name: &str, limit: u64) -> MemoryCgroup {
        let dir = Path::new("/sys/fs/cgroup/memory")
            .join(format!("twin-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the memory cgroup (cgroup v1)");
        std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string())
            .expect("set the limit");
        MemoryCgroup { dir }
    }

    pub fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).expect("move the process");
    }

    /// The most memory the cgroup's processes were charged at once.
    pub fn max_usage(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.max_usage_in_bytes"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.oom_control"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Its processes are gone by now (the test's processes drop first).
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_pid_is_alive_and_pid_zero_is_not() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
    }

    #[test]
    fn pidfd_sees_exit_of_a_child() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pidfd = PidFd::open(child.id()).expect("pidfd_open");
        assert!(pidfd.wait_exited(Duration::from_secs(10)).expect("poll"));
        assert!(child.wait().expect("wait").success());
    }

    #[test]
    fn pidfd_times_out_on_a_running_child_and_signals_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pidfd = PidFd::open(child.id()).expect("pidfd_open");
        assert!(!pidfd.wait_exited(Duration::from_millis(20)).expect("poll"));
        pidfd.send_signal(libc::SIGKILL).expect("kill");
        assert!(pidfd.wait_exited(Duration::from_secs(10)).expect("poll"));
        let status = child.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
