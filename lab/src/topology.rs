//! The standard layouts: `single` (one VM host) and `ha` (primary host, backup host, client,
//! LAN, replication link). See `tests/README-harness.md` for the picture.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::error::Result;
use crate::link::{Bridge, Tap, TapOptions, Veth};
use crate::netns::Netns;

/// The LAN's bridge name (in the LAN namespace and, in `ha`, in each host namespace).
pub const BRIDGE: &str = "br0";
/// The VM's TAP name, in whichever namespace the VMM runs in.
pub const TAP: &str = "tap0";
/// The client's interface name inside the client namespace.
pub const CLIENT_IF: &str = "eth0";
/// The host's LAN uplink (a veth into the LAN bridge) in `ha` host namespaces.
pub const UPLINK_IF: &str = "lan0";
/// The replication interface in `ha` host namespaces.
pub const REPL_IF: &str = "rep0";
/// The backup host's replication interface towards the standby.
pub const STANDBY_IF: &str = "rep1";

/// The client's LAN address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The guest's LAN address.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The LAN prefix length.
pub const LAN_PREFIX: u8 = 24;
/// The guest's address as `twin run --ip` takes it.
pub const GUEST_CIDR: &str = "10.0.0.2/24";
/// The guest service's TCP port.
pub const GUEST_PORT: u16 = 7000;
/// The primary host's replication address.
pub const PRIMARY_REPL_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
/// The backup host's replication address.
pub const BACKUP_REPL_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
/// The standby host's replication address (on its link with the backup host).
pub const STANDBY_REPL_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 76, 3);
/// The backup host's address on its replication link with the standby.
pub const BACKUP_TO_STANDBY_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 76, 2);
/// The replication link's prefix length.
pub const REPL_PREFIX: u8 = 24;

/// The guest service's socket address.
pub fn guest_service() -> std::net::SocketAddr {
    (GUEST_ADDR, GUEST_PORT).into()
}

/// Entry point for the standard layouts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Topology {
    tap: TapOptions,
}

impl Topology {
    /// A builder with default options.
    pub fn builder() -> Self {
        Self::default()
    }

    /// How the VM TAPs are created.
    pub fn tap_options(mut self, tap: TapOptions) -> Self {
        self.tap = tap;
        self
    }

    /// The `single` layout with default options.
    pub fn single() -> Result<Single> {
        Self::default().build_single()
    }

    /// The `ha` layout with default options.
    pub fn ha() -> Result<Ha> {
        Self::default().build_ha()
    }

    /// Builds the `single` layout: a LAN namespace with `br0` and `tap0` (run the VMM there)
    /// and a client namespace at 10.0.0.1/24 on the bridge.
    pub fn build_single(self) -> Result<Single> {
        let lan = Lan::new()?;
        let tap = Tap::create(&lan.ns, TAP, self.tap)?;
        lan.bridge.enslave(TAP)?;
        let client = lan.attach("client", Some(&format!("{CLIENT_ADDR}/{LAN_PREFIX}")))?;
        Ok(Single { tap, client, lan })
    }

    /// Builds the `ha` layout: a LAN namespace with the switch `br0`; a client namespace at
    /// 10.0.0.1/24 on it; a primary and a backup host namespace, each with its own `br0`
    /// holding its `tap0` and an uplink veth `lan0` into the LAN switch; and a replication veth
    /// `rep0` between the two hosts with 192.168.77.1/24 and 192.168.77.2/24.
    pub fn build_ha(self) -> Result<Ha> {
        let lan = Lan::new()?;
        let client = lan.attach("client", Some(&format!("{CLIENT_ADDR}/{LAN_PREFIX}")))?;
        let primary = Host::new(&lan, HostRole::Primary, self.tap)?;
        let backup = Host::new(&lan, HostRole::Backup, self.tap)?;
        let repl = Veth::create(&primary.ns, REPL_IF, &backup.ns, REPL_IF)?;
        primary
            .ns
            .add_addr(REPL_IF, &format!("{PRIMARY_REPL_ADDR}/{REPL_PREFIX}"))?;
        backup
            .ns
            .add_addr(REPL_IF, &format!("{BACKUP_REPL_ADDR}/{REPL_PREFIX}"))?;
        Ok(Ha {
            primary,
            backup,
            repl,
            standby: None,
            client,
            lan,
        })
    }

    /// The `ha` layout with a third host, the standby, on the LAN like the other two and on
    /// a replication link of its own with the backup (for a chain of failovers).
    pub fn ha_with_standby() -> Result<Ha> {
        let mut ha = Self::default().build_ha()?;
        let standby = Host::new(&ha.lan, HostRole::Standby, Self::default().tap)?;
        let link = Veth::create(&ha.backup.ns, STANDBY_IF, &standby.ns, REPL_IF)?;
        ha.backup.ns.add_addr(
            STANDBY_IF,
            &format!("{BACKUP_TO_STANDBY_ADDR}/{REPL_PREFIX}"),
        )?;
        standby
            .ns
            .add_addr(REPL_IF, &format!("{STANDBY_REPL_ADDR}/{REPL_PREFIX}"))?;
        ha.standby = Some((standby, link));
        Ok(ha)
    }
}

/// The LAN: a namespace holding the switch bridge `br0`.
#[derive(Debug)]
pub struct Lan {
    /// The bridge (dropped before the namespace handle, though either order works).
    pub bridge: Bridge,
    /// The LAN namespace.
    pub ns: Netns,
    ports: AtomicU32,
}

impl Lan {
    /// Creates the LAN namespace and its bridge.
    pub fn new() -> Result<Self> {
        let ns = Netns::new("lan")?;
        let bridge = Bridge::create(&ns, BRIDGE)?;
        Ok(Self {
            bridge,
            ns,
            ports: AtomicU32::new(0),
        })
    }

    /// A fresh name for a bridge port in the LAN namespace.
    fn port_name(&self, prefix: &str) -> String {
        let n = self.ports.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}{n}")
    }

    /// Connects `ns`'s interface `ifname` to the LAN switch by a new veth pair.
    pub fn plug(&self, ns: &Netns, ifname: &str) -> Result<Veth> {
        let port = self.port_name("p");
        let veth = Veth::create(ns, ifname, &self.ns, &port)?;
        self.bridge.enslave(&port)?;
        Ok(veth)
    }

    /// Creates a new namespace (`role`) whose `eth0` is on the LAN, with address `cidr`.
    pub fn attach(&self, role: &str, cidr: Option<&str>) -> Result<LanPeer> {
        let ns = Netns::new(role)?;
        let link = self.plug(&ns, CLIENT_IF)?;
        if let Some(cidr) = cidr {
            ns.add_addr(CLIENT_IF, cidr)?;
        }
        Ok(LanPeer { link, ns })
    }
}

/// A namespace with one interface, `eth0`, on the LAN.
#[derive(Debug)]
pub struct LanPeer {
    /// The veth: `eth0` in `ns`, a bridge port in the LAN namespace.
    pub link: Veth,
    /// The peer's namespace.
    pub ns: Netns,
}

/// The `single` layout. Run the VMM in [`Single::vm_ns`] (it holds `tap0`).
#[derive(Debug)]
pub struct Single {
    /// `tap0`, a port of the LAN bridge.
    pub tap: Tap,
    /// The client at 10.0.0.1.
    pub client: LanPeer,
    /// The LAN namespace and bridge.
    pub lan: Lan,
}

impl Single {
    /// Where to run `twin run --tap tap0`.
    pub fn vm_ns(&self) -> &Netns {
        &self.lan.ns
    }

    /// Where to run guest clients.
    pub fn client_ns(&self) -> &Netns {
        &self.client.ns
    }

    /// Names of every namespace of this layout (to check they are gone after drop).
    pub fn namespace_names(&self) -> Vec<String> {
        vec![self.lan.ns.name().into(), self.client.ns.name().into()]
    }
}

/// Which host of the `ha` layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRole {
    /// The host that runs the VM at first (192.168.77.1).
    Primary,
    /// The host that receives checkpoints (192.168.77.2).
    Backup,
    /// A third host, the backup's standby in a chain of failovers (192.168.76.3, on its
    /// own replication link with the backup).
    Standby,
}

impl HostRole {
    fn label(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Backup => "backup",
            Self::Standby => "standby",
        }
    }
}

/// One VM host of the `ha` layout.
#[derive(Debug)]
pub struct Host {
    /// `tap0`, a port of the host's own `br0`.
    pub tap: Tap,
    /// The uplink veth: `lan0` here (a port of `bridge`), a port of the LAN switch there.
    pub uplink: Veth,
    /// The host's bridge `br0` joining `tap0` and `lan0`.
    pub bridge: Bridge,
    /// The host's namespace: run this host's `twin` process here.
    pub ns: Netns,
    /// Its address on the replication link.
    pub repl_addr: Ipv4Addr,
    /// Which host it is.
    pub role: HostRole,
}

impl Host {
    pub(crate) fn new(lan: &Lan, role: HostRole, tap: TapOptions) -> Result<Self> {
        let ns = Netns::new(role.label())?;
        let bridge = Bridge::create(&ns, BRIDGE)?;
        let tap = Tap::create(&ns, TAP, tap)?;
        bridge.enslave(TAP)?;
        let uplink = lan.plug(&ns, UPLINK_IF)?;
        bridge.enslave(UPLINK_IF)?;
        let repl_addr = match role {
            HostRole::Primary => PRIMARY_REPL_ADDR,
            HostRole::Backup => BACKUP_REPL_ADDR,
            HostRole::Standby => STANDBY_REPL_ADDR,
        };
        Ok(Self {
            tap,
            uplink,
            bridge,
            ns,
            repl_addr,
            role,
        })
    }
}

/// A direction on the replication link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Packets from the primary to the backup.
    PrimaryToBackup,
    /// Packets from the backup to the primary.
    BackupToPrimary,
    /// Both.
    Both,
}

impl Direction {
    fn includes(self, from: HostRole) -> bool {
        matches!(
            (self, from),
            (Self::Both, _)
                | (Self::PrimaryToBackup, HostRole::Primary)
                | (Self::BackupToPrimary, HostRole::Backup)
        )
    }
}

/// How to break the replication link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// `ip link set rep0 down` on the primary side: both ends lose carrier, sends fail
    /// locally with "network unreachable" on the primary.
    LinkDown,
    /// Silently drop every IPv4 packet travelling in a direction, with an nftables `netdev`
    /// ingress rule on the receiving end: like a partition, the sender sees no error. ARP is
    /// let through so that a one-way cut stays one-way (with ARP dropped too, neither side
    /// could resolve the other once its neighbour entry expires).
    Drop(Direction),
}

/// A token-bucket limit for the replication link (`tc qdisc … tbf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tbf {
    /// Rate in kbit/s.
    pub rate_kbit: u32,
    /// Bucket size in bytes.
    pub burst_bytes: u32,
    /// Longest a packet may wait in the queue before being dropped.
    pub latency: Duration,
}

impl Tbf {
    /// A limit of `rate_kbit` with a bucket and queue sized for it.
    pub fn rate_kbit(rate_kbit: u32) -> Self {
        Self {
            rate_kbit,
            burst_bytes: (rate_kbit / 8 * 10).max(16 * 1024),
            latency: Duration::from_millis(500),
        }
    }
}

/// nftables table used for cuts, one per receiving namespace.
const CUT_TABLE: &str = "twt_cut";

/// The `ha` layout.
#[derive(Debug)]
pub struct Ha {
    /// The primary host.
    pub primary: Host,
    /// The backup host.
    pub backup: Host,
    /// The replication veth `rep0` (primary end first).
    pub repl: Veth,
    /// A third host and its replication link with the backup (`rep1` there, `rep0` on the
    /// standby, 192.168.76.2 ↔ .3), with [`Topology::ha_with_standby`].
    pub standby: Option<(Host, Veth)>,
    /// The client at 10.0.0.1.
    pub client: LanPeer,
    /// The LAN switch.
    pub lan: Lan,
}

impl Ha {
    /// The host with `role`.
    pub fn host(&self, role: HostRole) -> &Host {
        match role {
            HostRole::Primary => &self.primary,
            HostRole::Backup => &self.backup,
            HostRole::Standby => {
                &self
                    .standby
                    .as_ref()
                    .expect("this layout has no standby (Topology::ha_with_standby)")
                    .0
            }
        }
    }

    /// Where to run guest clients.
    pub fn client_ns(&self) -> &Netns {
        &self.client.ns
    }

    /// Names of every namespace of this layout.
    pub fn namespace_names(&self) -> Vec<String> {
        let mut v: Vec<String> = [
            &self.lan.ns,
            &self.client.ns,
            &self.primary.ns,
            &self.backup.ns,
        ]
        .iter()
        .map(|ns| ns.name().to_string())
        .collect();
        if let Some((s, _)) = &self.standby {
            v.push(s.ns.name().to_string());
        }
        v
    }

    /// Breaks the replication link. Cuts add up (a drop in each direction is `Both`).
    pub fn cut_replication(&self, cut: Cut) -> Result<()> {
        match cut {
            Cut::LinkDown => self.primary.ns.link_down(REPL_IF),
            Cut::Drop(dir) => {
                for from in [HostRole::Primary, HostRole::Backup] {
                    if dir.includes(from) {
                        let receiver = match from {
                            HostRole::Primary => &self.backup,
                            HostRole::Backup => &self.primary,
                            HostRole::Standby => unreachable!("the loop names primary and backup"),
                        };
                        receiver.ns.run_with_input(
                            &["nft", "-f", "-"],
                            // Replace the table, so that repeating a cut stays one rule.
                            &format!(
                                "add table netdev {CUT_TABLE}\n\
                                 delete table netdev {CUT_TABLE}\n\
                                 table netdev {CUT_TABLE} {{\n\
                                 \tchain ingress_{REPL_IF} {{\n\
                                 \t\ttype filter hook ingress device \"{REPL_IF}\" priority 0;\n\
                                 \t\tmeta protocol ip drop\n\
                                 \t}}\n\
                                 }}\n"
                            ),
                        )?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Undoes every cut and every rate limit on the replication link.
    pub fn restore_replication(&self) -> Result<()> {
        for host in [&self.primary, &self.backup] {
            // Adding then deleting makes this idempotent on nft versions without `destroy`.
            host.ns.run_with_input(
                &["nft", "-f", "-"],
                &format!("add table netdev {CUT_TABLE}\ndelete table netdev {CUT_TABLE}\n"),
            )?;
            host.ns.link_up(REPL_IF)?;
        }
        self.unslow_replication()
    }

    /// Limits the replication link in direction `dir` with a token bucket on the sender's
    /// egress.
    pub fn slow_replication(&self, dir: Direction, tbf: Tbf) -> Result<()> {
        let rate = format!("{}kbit", tbf.rate_kbit);
        let burst = tbf.burst_bytes.to_string();
        let latency = format!("{}ms", tbf.latency.as_millis());
        for host in [&self.primary, &self.backup] {
            if dir.includes(host.role) {
                host.ns.run(&[
                    "tc", "qdisc", "replace", "dev", REPL_IF, "root", "tbf", "rate", &rate,
                    "burst", &burst, "latency", &latency,
                ])?;
            }
        }
        Ok(())
    }

    /// Removes rate limits from both ends of the replication link.
    pub fn unslow_replication(&self) -> Result<()> {
        for host in [&self.primary, &self.backup] {
            let qdisc = host
                .ns
                .run(&["tc", "qdisc", "show", "dev", REPL_IF, "root"])?;
            if qdisc.contains("tbf") {
                host.ns
                    .run(&["tc", "qdisc", "del", "dev", REPL_IF, "root"])?;
            }
        }
        Ok(())
    }

    /// Disconnects host `role` from the LAN (its uplink goes down on the host side): its VM
    /// can no longer reach the client, as when a host's LAN NIC or switch port fails.
    pub fn isolate_lan(&self, role: HostRole) -> Result<()> {
        self.host(role).ns.link_down(UPLINK_IF)
    }

    /// Reconnects host `role` to the LAN.
    pub fn reconnect_lan(&self, role: HostRole) -> Result<()> {
        self.host(role).ns.link_up(UPLINK_IF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions_cover_the_right_senders() {
        assert!(Direction::Both.includes(HostRole::Primary));
        assert!(Direction::Both.includes(HostRole::Backup));
        assert!(Direction::PrimaryToBackup.includes(HostRole::Primary));
        assert!(!Direction::PrimaryToBackup.includes(HostRole::Backup));
        assert!(Direction::BackupToPrimary.includes(HostRole::Backup));
        assert!(!Direction::BackupToPrimary.includes(HostRole::Primary));
    }

    #[test]
    fn tbf_burst_has_a_floor() {
        assert_eq!(Tbf::rate_kbit(8).burst_bytes, 16 * 1024);
        assert_eq!(Tbf::rate_kbit(100_000).burst_bytes, 125_000);
    }

    #[test]
    fn guest_service_address() {
        assert_eq!(guest_service().to_string(), "10.0.0.2:7000");
        assert_eq!(GUEST_CIDR, format!("{GUEST_ADDR}/{LAN_PREFIX}"));
    }
}
