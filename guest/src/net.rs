//! The network side of the main loop: smoltcp on virtio-net, and the TCP line service on
//! port 7000.

use crate::arch::{irq_count, IRQ_CONFIG};
use crate::proto::MAX_LINE;
use crate::service::{Guest, NetStats, Reply, MAX_REPLY};
use crate::virtio::VirtioNet;
use alloc::vec;
use alloc::vec::Vec;
use smoltcp::iface::{Config, Interface, PollIngressSingleResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

/// TCP port of the service.
pub const PORT: u16 = 7000;
/// Concurrent connections served.
pub const SOCKETS: usize = 32;
/// Most frames taken from the device per main-loop iteration.
const RX_BUDGET: usize = 128;
const RX_BUF: usize = 8 << 10;
const TX_BUF: usize = 16 << 10;

struct Conn {
    handle: SocketHandle,
    line: [u8; MAX_LINE],
    len: usize,
    too_long: bool,
    established: bool,
}

/// The interface, its sockets and the per-connection line state.
pub struct Net {
    pub dev: VirtioNet,
    iface: Interface,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
    ip: Ipv4Address,
    config_seen: u64,
    connections: u64,
    reply: Reply,
    pub gratuitous_arps: u64,
    reported_reset: bool,
}

fn instant(ns: u64) -> Instant {
    Instant::from_micros((ns / 1000) as i64)
}

impl Net {
    /// Set up the interface with the address from `BootInfo` and the listening sockets.
    pub fn new(
        mut dev: VirtioNet,
        ip: [u8; 4],
        prefix: u8,
        gateway: [u8; 4],
        now_ns: u64,
        seed: u64,
    ) -> Net {
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(dev.info.mac)));
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut dev, instant(now_ns));
        let ip = Ipv4Address::from(ip);
        if !ip.is_unspecified() {
            iface.update_ip_addrs(|addrs| {
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(ip), prefix));
            });
        }
        let gw = Ipv4Address::from(gateway);
        if !gw.is_unspecified() {
            let _ = iface.routes_mut().add_default_ipv4_route(gw);
        }
        let mut sockets = SocketSet::new(Vec::with_capacity(SOCKETS));
        let mut conns = Vec::with_capacity(SOCKETS);
        for _ in 0..SOCKETS {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; RX_BUF]),
                tcp::SocketBuffer::new(vec![0; TX_BUF]),
            );
            s.set_nagle_enabled(false);
            s.set_keep_alive(Some(Duration::from_secs(15)));
            s.set_timeout(Some(Duration::from_secs(60)));
            let _ = s.listen(PORT);
            conns.push(Conn {
                handle: sockets.add(s),
                line: [0; MAX_LINE],
                len: 0,
                too_long: false,
                established: false,
            });
        }
        let mut net = Net {
            dev,
            iface,
            sockets,
            conns,
            ip,
            config_seen: irq_count(IRQ_CONFIG),
            connections: 0,
            reply: Reply::new(),
            gratuitous_arps: 0,
            reported_reset: false,
        };
        net.announce();
        net
    }

    /// Broadcast a gratuitous ARP for our address, so bridges and neighbours learn where we
    /// are (at boot, and on a device configuration-change interrupt, e.g. after failover).
    pub fn announce(&mut self) {
        if self.ip.is_unspecified() {
            return;
        }
        let mac = self.dev.info.mac;
        let ip = self.ip.octets();
        self.dev.send_frame(42, |f| {
            f[0..6].copy_from_slice(&[0xFF; 6]);
            f[6..12].copy_from_slice(&mac);
            f[12..14].copy_from_slice(&[0x08, 0x06]);
            f[14..22].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
            f[22..28].copy_from_slice(&mac);
            f[28..32].copy_from_slice(&ip);
            f[32..38].copy_from_slice(&[0; 6]);
            f[38..42].copy_from_slice(&ip);
        });
        self.dev.flush();
        self.gratuitous_arps += 1;
    }

    /// Counters for `STATS`.
    pub fn stats(&self) -> NetStats {
        NetStats {
            rx_packets: self.dev.rx.packets,
            tx_packets: self.dev.tx.packets,
            tx_dropped: self.dev.tx.dropped,
            rx_kicks: self.dev.rx.kicks,
            tx_kicks: self.dev.tx.kicks,
            connections: self.connections,
            gratuitous_arps: self.gratuitous_arps,
        }
    }

    /// One round of network work. Returns whether anything happened (packets moved or a
    /// request was served), i.e. whether the caller should go round again before idling.
    pub fn poll(&mut self, g: &mut Guest, now_ns: u64) -> bool {
        let config = irq_count(IRQ_CONFIG);
        if config != self.config_seen {
            self.config_seen = config;
            if self.dev.needs_reset() && !self.reported_reset {
                self.reported_reset = true;
                crate::println!(
                    "twin-guest: warning: virtio-net set DEVICE_NEEDS_RESET; the network is down"
                );
            }
            let up = self.dev.link_up();
            if up != self.dev.info.link_up {
                self.dev.info.link_up = up;
                crate::println!(
                    "twin-guest: virtio-net link {}",
                    if up { "up" } else { "down" }
                );
            }
            self.announce();
        }
        let (rx0, tx0) = (self.dev.rx.packets, self.dev.tx.packets);
        self.dev.tx.reclaim();
        let ts = instant(now_ns);
        self.iface.poll_maintenance(ts);
        // Bounded ingress, so a flood cannot starve the rest of the main loop.
        for _ in 0..RX_BUDGET {
            if self
                .iface
                .poll_ingress_single(ts, &mut self.dev, &mut self.sockets)
                == PollIngressSingleResult::None
            {
                break;
            }
        }
        let served = self.serve(g);
        self.iface.poll_egress(ts, &mut self.dev, &mut self.sockets);
        self.dev.flush();
        served || self.dev.rx.packets != rx0 || self.dev.tx.packets != tx0
    }

    /// Does smoltcp want to be polled before `now_ns` plus a tick? (Only when it can make
    /// progress: with no free TX descriptor it waits for the TX interrupt.)
    pub fn wants_poll(&mut self, now_ns: u64) -> bool {
        let ts = instant(now_ns);
        self.dev.tx.has_free()
            && matches!(self.iface.poll_at(ts, &self.sockets), Some(at) if at <= ts)
    }

    /// Read complete request lines from every connection and queue their replies.
    fn serve(&mut self, g: &mut Guest) -> bool {
        let stats = self.stats();
        let mut served = false;
        for c in self.conns.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if !s.is_open() {
                // Closed (peer reset, timed out, or finished): listen again.
                c.len = 0;
                c.too_long = false;
                c.established = false;
                let _ = s.listen(PORT);
                continue;
            }
            if s.is_active() && !c.established && s.state() != tcp::State::SynReceived {
                c.established = true;
                self.connections += 1;
            }
            while s.can_recv() && s.send_capacity() - s.send_queue() >= MAX_REPLY {
                let line = &mut c.line;
                let len = &mut c.len;
                let too_long = &mut c.too_long;
                let complete = s.recv(|buf| {
                    let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                        Some(p) => (p + 1, true),
                        None => (buf.len(), false),
                    };
                    let data = &buf[..if done { take - 1 } else { take }];
                    let room = MAX_LINE - *len;
                    if data.len() > room {
                        *too_long = true;
                    }
                    let n = data.len().min(room);
                    line[*len..*len + n].copy_from_slice(&data[..n]);
                    *len += n;
                    (take, done)
                });
                match complete {
                    Ok(true) => {
                        self.reply.clear();
                        g.handle(&c.line[..c.len], c.too_long, &stats, &mut self.reply);
                        let _ = s.send_slice(self.reply.line());
                        c.len = 0;
                        c.too_long = false;
                        served = true;
                    }
                    Ok(false) => {}
                    Err(_) => break,
                }
            }
            if s.state() == tcp::State::CloseWait && !s.can_recv() {
                // The peer is done sending; replies already queued still go out before our FIN.
                s.close();
            }
        }
        served
    }
}
