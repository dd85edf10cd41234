//! A real etcd server (Debian's `etcd-server`) in a namespace of its own, reachable from
//! the primary and the backup host of an `ha` layout over two links that can be cut
//! apart: the arbiter of the arbitration tests.
//!
//! ```text
//!   primary ns  ep0 192.168.78.1 ──── 192.168.78.254 ep0 ┐
//!   backup ns   ep0 192.168.79.2 ──── 192.168.79.254 ep1 ├ etcd ns (etcd listens on each)
//!   standby ns  ep0 192.168.80.3 ──── 192.168.80.254 ep2 ┘ (with a standby)
//! ```

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};
use crate::link::Veth;
use crate::netns::Netns;
use crate::process::{TestDir, TwinProcess};
use crate::topology::{Ha, HostRole};

/// The etcd-side interface towards the primary host, the backup host and the standby.
const TO_PRIMARY: &str = "ep0";
const TO_BACKUP: &str = "ep1";
const TO_STANDBY: &str = "ep2";
/// The host side's interface name.
const HOST_IF: &str = "ep0";
/// etcd's client port.
pub const ETCD_PORT: u16 = 2379;

fn net(role: HostRole) -> (Ipv4Addr, Ipv4Addr) {
    let third = match role {
        HostRole::Primary => 78,
        HostRole::Backup => 79,
        HostRole::Standby => 80,
    };
    let host = match role {
        HostRole::Primary => 1,
        HostRole::Backup => 2,
        HostRole::Standby => 3,
    };
    (
        Ipv4Addr::new(192, 168, third, 254),
        Ipv4Addr::new(192, 168, third, host),
    )
}

/// The etcd host. Killed and removed on drop.
pub struct EtcdHost {
    // The server first, then the links, then the namespace.
    server: Option<TwinProcess>,
    _links: Vec<Veth>,
    roles: Vec<HostRole>,
    pub ns: Netns,
    data_dir: std::path::PathBuf,
    /// Servers started so far (each gets its own log files).
    starts: usize,
}

impl EtcdHost {
    /// Starts etcd in a new namespace linked to `ha`'s primary and backup hosts; its data
    /// lives in `dir`. Waits until it answers.
    pub fn start(ha: &Ha, dir: &TestDir) -> Result<EtcdHost> {
        let ns = Netns::new("etcd")?;
        ns.link_up("lo")?;
        let mut roles = vec![HostRole::Primary, HostRole::Backup];
        if ha.standby.is_some() {
            roles.push(HostRole::Standby);
        }
        let mut links = Vec::new();
        for &role in &roles {
            let host = &ha.host(role).ns;
            links.push(Veth::create(&ns, Self::ifname(role), host, HOST_IF)?);
            let (etcd_addr, host_addr) = net(role);
            ns.add_addr(Self::ifname(role), &format!("{etcd_addr}/24"))?;
            host.add_addr(HOST_IF, &format!("{host_addr}/24"))?;
        }
        let mut host = EtcdHost {
            server: None,
            _links: links,
            roles,
            ns,
            data_dir: dir.join("etcd-data"),
            starts: 0,
        };
        host.run_server(dir)?;
        Ok(host)
    }

    fn run_server(&mut self, dir: &TestDir) -> Result<()> {
        let clients = self
            .roles
            .iter()
            .map(|&r| format!("http://{}:{ETCD_PORT}", net(r).0))
            .collect::<Vec<_>>()
            .join(",");
        let data = self.data_dir.to_string_lossy().into_owned();
        let args = [
            "--name",
            "arbiter",
            "--data-dir",
            &data,
            "--listen-client-urls",
            &clients,
            "--advertise-client-urls",
            &clients,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "arbiter=http://127.0.0.1:2380",
        ];
        let etcd = which("etcd").ok_or_else(|| {
            HarnessError::InvalidArgument(
                "etcd is not installed (Debian: etcd-server; .ci/run installs it)".into(),
            )
        })?;
        self.starts += 1;
        let name = format!("etcd{}", self.starts);
        let server = TwinProcess::spawn_program(&self.ns, dir, &name, &etcd, &args, &[])?;
        self.server = Some(server);
        self.wait_ready(Duration::from_secs(30))
    }

    /// The `--arbiter` URL for the host with `role`.
    pub fn url(&self, role: HostRole) -> String {
        let (addr, _) = net(role);
        format!("etcd://{addr}:{ETCD_PORT}")
    }

    /// Waits until etcd answers a range request, from inside its namespace.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let (addr, _) = net(HostRole::Primary);
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self.ns.enter(|| {
                std::net::TcpStream::connect_timeout(
                    &(addr, ETCD_PORT).into(),
                    Duration::from_millis(200),
                )
                .is_ok()
            })?;
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: "etcd to listen".into(),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Cuts the link between etcd and the host with `role` (both ways, link down).
    pub fn cut(&self, role: HostRole) -> Result<()> {
        self.ns.link_down(Self::ifname(role))
    }

    /// Restores a cut link.
    pub fn restore(&self, role: HostRole) -> Result<()> {
        self.ns.link_up(Self::ifname(role))
    }

    fn ifname(role: HostRole) -> &'static str {
        match role {
            HostRole::Primary => TO_PRIMARY,
            HostRole::Backup => TO_BACKUP,
            HostRole::Standby => TO_STANDBY,
        }
    }

    /// Kills the server (SIGKILL): the arbiter is down.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut s) = self.server.take() {
            s.kill()?;
        }
        Ok(())
    }

    /// Starts the server again on its data: the records survive.
    pub fn restart(&mut self, dir: &TestDir) -> Result<()> {
        self.kill()?;
        self.run_server(dir)
    }
}

impl Drop for EtcdHost {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
        }
    }
}

/// Whether etcd is installed (in `PATH`).
pub fn installed() -> bool {
    which("etcd").is_some()
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.is_file())
}
