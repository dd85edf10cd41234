//! End-to-end and fault-injection test harness: network namespaces, bridges, veths, TAPs,
//! real `twin` processes and a client for the built-in guest's service.
//!
//! Everything the harness creates lives in namespaces named `twt-<pid>-<n>-<role>` and is
//! removed on drop, also when a test panics; [`cleanup_stale`] removes what crashed runs
//! left. Nothing in the initial network namespace is touched. Every wait is bounded.
//!
//! See `tests/README-harness.md` for the layouts. Its users: the end-to-end tests
//! (`twin-tests`, `tests/tests/`) and this crate's `twin-lab` binary (`src/bin/twin-lab/`:
//! the demo and the bench, which `twin demo` and `twin bench` run).
//!
//! ```no_run
//! use std::time::Duration;
//! use twin_lab::*;
//!
//! require_kvm();
//! let topo = Topology::single().unwrap();
//! let dir = TestDir::new("example").unwrap();
//! let mut vm = TwinProcess::spawn(
//!     topo.vm_ns(),
//!     &dir,
//!     "vm",
//!     &["run", "--tap", TAP, "--ip", GUEST_CIDR, "--mem", "256M"],
//! )
//! .unwrap();
//! let mut guest = GuestClient::connect_retry(
//!     topo.client_ns(),
//!     guest_service(),
//!     Duration::from_secs(60),
//!     || vm.ensure_running(),
//! )
//! .unwrap();
//! assert_eq!(guest.incr("k").unwrap(), 1);
//! vm.terminate().unwrap();
//! assert!(vm.wait_exit(Duration::from_secs(10)).unwrap().success());
//! ```

mod cmd;
mod error;
pub mod etcd;
pub mod events;
mod guest;
mod link;
mod load;
mod netns;
mod process;
pub mod proxy;
pub mod rig;
pub mod stranger;
mod sys;
mod tmpfs;
mod topology;

pub use cmd::{CmdOutput, DEFAULT_COMMAND_TIMEOUT};
pub use error::{HarnessError, Result};
pub use guest::{parse_stats, parse_verify, GuestClient, Verify, DEFAULT_REQUEST_TIMEOUT};
pub use link::{Bridge, Tap, TapHandle, TapOptions, Veth, MAX_IFNAME};
pub use load::{check_incr_sequence, IncrLoad, Op, OpKind};
pub use netns::{cleanup_stale, Netns, StaleReport, PREFIX};
pub use process::{
    assert_no_panic, describe_status, tails, twin_bin, twin_status, Finished, Mark, Signal, Stream,
    TestDir, TwinProcess,
};
pub use sys::MemoryCgroup;
pub use tmpfs::TinyFs;
pub use topology::{
    guest_service, Cut, Direction, Ha, Host, HostRole, Lan, LanPeer, Single, Tbf, Topology,
    BACKUP_REPL_ADDR, BACKUP_TO_STANDBY_ADDR, BRIDGE, CLIENT_ADDR, CLIENT_IF, GUEST_ADDR,
    GUEST_CIDR, GUEST_PORT, LAN_PREFIX, PRIMARY_REPL_ADDR, REPL_IF, REPL_PREFIX, STANDBY_IF,
    STANDBY_REPL_ADDR, TAP, UPLINK_IF,
};

/// Panics with a clear message unless the tests run as root (namespaces, TAPs, nftables).
pub fn require_root() {
    assert!(
        sys::is_root(),
        "twin-tests: these tests create network namespaces, TAPs and nftables rules and must \
         run as root (CI does); run `sudo -E cargo test …` or as root"
    );
}

/// Panics with a clear message unless the tests run as root and `/dev/kvm` is usable.
pub fn require_kvm() {
    require_root();
    let kvm = std::path::Path::new("/dev/kvm");
    assert!(
        kvm.exists(),
        "twin-tests: /dev/kvm is missing: this test runs a real VM and needs KVM (CI has it); \
         load kvm (kvm_intel/kvm_amd/kvm_pvm) or run on a machine with KVM"
    );
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
        panic!("twin-tests: /dev/kvm exists but cannot be opened read-write: {e}");
    }
}

/// Checks `cond` until it holds or `timeout` passes (then a timeout error naming `what`).
/// For conditions nothing signals (a neighbour entry, a file appearing): it re-checks at
/// growing intervals from 5 ms up to 100 ms. An error from `cond` ends the wait.
pub fn wait_until(
    what: &str,
    timeout: std::time::Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if cond()? {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HarnessError::Timeout {
                what: what.to_string(),
                after: timeout,
            });
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}
