//! Network namespaces owned by a test, and the sweeper for those left by crashed runs.
//!
//! Every namespace is named `twt-<pid>-<counter>-<role>`: `pid` is the test process, so that
//! parallel test processes never collide and [`cleanup_stale`] can tell a leftover (its pid is
//! dead) from a namespace another live run still uses.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use crate::cmd::{self, CmdOutput};
use crate::error::{HarnessError, Result};
use crate::sys;

/// Prefix of everything the harness names (namespaces, temporary directories).
pub const PREFIX: &str = "twt-";

/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// A unique name `twt-<pid>-<n>-<role>` (used for namespaces and temp dirs).
pub(crate) fn unique_name(role: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let role: String = role
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(24)
        .collect();
    format!("{PREFIX}{}-{n}-{role}", std::process::id())
}

/// The pid embedded in a harness name, if `name` is one.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

#[derive(Debug)]
struct Inner {
    name: String,
    /// An open handle on the namespace, used to enter it.
    file: File,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = delete_namespace(&self.name) {
            eprintln!("twin-tests: could not delete namespace {}: {e}", self.name);
        }
    }
}

/// A network namespace that lives as long as any clone of this handle (devices and processes
/// the harness creates in it hold a clone). When the last clone is dropped — also while a
/// test panics — the processes still inside are killed and the namespace is deleted, which
/// deletes every virtual device in it.
#[derive(Debug, Clone)]
pub struct Netns {
    inner: Arc<Inner>,
}

impl Netns {
    /// Creates a namespace named `twt-<pid>-<n>-<role>` with `lo` up and IPv6 off (so the
    /// guest sees no router solicitations or DAD traffic). The first call in a process also
    /// runs [`cleanup_stale`].
    pub fn new(role: &str) -> Result<Self> {
        require_root_for("creating network namespaces")?;
        SWEEP.call_once(|| {
            if let Err(e) = cleanup_stale() {
                eprintln!("twin-tests: sweeping stale namespaces failed: {e}");
            }
        });
        let name = unique_name(role);
        cmd::run_ok(None, &["ip", "netns", "add", &name], None)?;
        let path = Path::new(NETNS_DIR).join(&name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = delete_namespace(&name);
                return Err(HarnessError::io(format!("opening {}", path.display()), e));
            }
        };
        let ns = Self {
            inner: Arc::new(Inner { name, file }),
        };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        for key in ["all", "default"] {
            ns.write_sysctl(&format!("net/ipv6/conf/{key}/disable_ipv6"), "1")?;
        }
        Ok(ns)
    }

    /// The namespace's name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether a namespace named `name` exists.
    pub fn exists(name: &str) -> bool {
        Path::new(NETNS_DIR).join(name).exists()
    }

    pub(crate) fn fd(&self) -> std::os::fd::RawFd {
        self.inner.file.as_raw_fd()
    }

    fn target(&self) -> Option<(&str, std::os::fd::RawFd)> {
        Some((self.name(), self.fd()))
    }

    /// Runs `argv` inside the namespace; a non-zero exit is an error. Returns stdout.
    pub fn run(&self, argv: &[&str]) -> Result<String> {
        cmd::run_ok(self.target(), argv, None)
    }

    /// Runs `argv` inside the namespace with `stdin` as its input (e.g. `nft -f -`).
    pub fn run_with_input(&self, argv: &[&str], stdin: &str) -> Result<String> {
        cmd::run_ok(self.target(), argv, Some(stdin))
    }

    /// Runs `argv` inside the namespace and returns how it ended, whatever the status.
    pub fn output(&self, argv: &[&str], timeout: Duration) -> Result<CmdOutput> {
        cmd::run(self.target(), argv, None, timeout)
    }

    /// Runs `f` on a thread that has entered this namespace and returns its result. Sockets
    /// created inside `f` belong to this namespace and may be used afterwards from any thread.
    /// A panic in `f` is propagated.
    pub fn enter<T, F>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let fd = self.fd();
        let joined =
            std::thread::scope(|s| s.spawn(move || sys::setns_net(fd).map(|()| f())).join());
        match joined {
            Ok(r) => r.map_err(|e| HarnessError::io(format!("setns into {}", self.name()), e)),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Sends one ICMP echo to `addr`; `Ok(true)` if a reply came within `timeout` (whole
    /// seconds, at least 1).
    pub fn ping(&self, addr: Ipv4Addr, timeout: Duration) -> Result<bool> {
        let secs = timeout.as_secs().max(1).to_string();
        let out = self.output(
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                "1",
                "-W",
                &secs,
                &addr.to_string(),
            ],
            timeout + Duration::from_secs(5),
        )?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(HarnessError::Command {
                command: format!("ping {addr}"),
                namespace: self.name().to_string(),
                status: out.status,
                stderr: out.stderr.trim().to_string(),
            }),
        }
    }

    /// Brings interface `ifname` up.
    pub fn link_up(&self, ifname: &str) -> Result<()> {
        self.run(&["ip", "link", "set", ifname, "up"]).map(drop)
    }

    /// Takes interface `ifname` down.
    pub fn link_down(&self, ifname: &str) -> Result<()> {
        self.run(&["ip", "link", "set", ifname, "down"]).map(drop)
    }

    /// Adds an address in CIDR form (`10.0.0.1/24`) to `ifname`.
    pub fn add_addr(&self, ifname: &str, cidr: &str) -> Result<()> {
        self.run(&["ip", "addr", "add", cidr, "dev", ifname])
            .map(drop)
    }

    /// Writes `value` to `/proc/sys/<key>` as seen from inside the namespace (`key` like
    /// `net/ipv4/ip_forward`).
    pub fn write_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(key);
        self.enter(|| std::fs::write(&path, value))?.map_err(|e| {
            HarnessError::io(format!("writing {} in {}", path.display(), self.name()), e)
        })
    }

    /// Pids of the processes whose network namespace is this one.
    pub fn pids(&self) -> Result<Vec<u32>> {
        pids_in(self.name())
    }
}

fn pids_in(name: &str) -> Result<Vec<u32>> {
    let out = cmd::run_ok(None, &["ip", "netns", "pids", name], None)?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Kills whatever still runs in namespace `name` and deletes it.
fn delete_namespace(name: &str) -> Result<()> {
    if let Ok(pids) = pids_in(name) {
        for pid in pids {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: `kill` takes two integers; a stale pid just yields ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    cmd::run_ok(None, &["ip", "netns", "delete", name], None).map(drop)
}

fn require_root_for(what: &str) -> Result<()> {
    if sys::is_root() {
        Ok(())
    } else {
        Err(HarnessError::InvalidArgument(format!(
            "{what} needs root; run the tests as root"
        )))
    }
}

/// What [`cleanup_stale`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StaleReport {
    /// Namespaces deleted.
    pub namespaces: Vec<String>,
    /// Temporary directories deleted.
    pub dirs: Vec<PathBuf>,
}

/// Deletes what earlier, crashed harness runs left behind: `twt-<pid>-…` namespaces (with any
/// process still inside them, and so every link, bridge and TAP in them) and temporary
/// directories whose `pid` is no longer alive. Everything a live process (including this
/// one) owns is left alone, so it is safe while other tests run. The harness never creates
/// links in the initial namespace, so none are left there to sweep.
pub fn cleanup_stale() -> Result<StaleReport> {
    let mut report = StaleReport::default();
    let me = std::process::id();
    let is_stale =
        |name: &str| owner_pid(name).is_some_and(|pid| pid != me && !sys::pid_alive(pid));
    if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_stale(&name) {
                delete_namespace(&name)?;
                report.namespaces.push(name);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_stale(&name) && entry.path().is_dir() {
                std::fs::remove_dir_all(entry.path()).map_err(|e| {
                    HarnessError::io(format!("removing {}", entry.path().display()), e)
                })?;
                report.dirs.push(entry.path());
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_carry_the_pid() {
        let a = unique_name("lan");
        let b = unique_name("lan");
        assert_ne!(a, b);
        assert_eq!(owner_pid(&a), Some(std::process::id()));
        assert!(a.ends_with("-lan"));
    }

    #[test]
    fn odd_roles_are_sanitised() {
        let n = unique_name("a b/c");
        assert!(n.ends_with("-a_b_c"), "{n}");
    }

    #[test]
    fn owner_pid_ignores_foreign_names() {
        assert_eq!(owner_pid("twt-123-4-x"), Some(123));
        assert_eq!(owner_pid("twt-abc"), None);
        assert_eq!(owner_pid("other-123"), None);
    }
}
