//! The network side of the main loop: smoltcp on virtio-net, the TCP line service on port
//! 7000 and the Redis protocol on port 6379.
//!
//! Each connection has an output queue: replies go into it and out as the socket's send
//! buffer takes them, and a connection with output still queued reads no more requests (a
//! client that pipelines faster than it reads is slowed, not answered out of order or
//! dropped).

use crate::arch::{irq_count, IRQ_CONFIG};
use crate::identity::Identity;
use crate::proto::MAX_LINE;
use crate::resp;
use crate::service::{After, Guest, NetStats, Reply, SocketCensus};
use crate::virtio::VirtioNet;
use alloc::vec;
use alloc::vec::Vec;
use smoltcp::iface::{Config, Interface, PollIngressSingleResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

/// TCP port of the line service.
pub const PORT: u16 = 7000;
/// TCP port of the Redis protocol.
pub const REDIS_PORT: u16 = 6379;
/// smoltcp has no listen backlog: a SYN that finds no socket in LISTEN is answered with a
/// reset. So every port keeps at least this many sockets listening, adding sockets as
/// connections take them (a burst of new connections while others are still closing, e.g.
/// their FIN held by output commit, must not be refused).
const SPARE_LISTENERS: usize = 32;
/// Frames taken in between two checks of the spare listeners.
const LISTEN_CHECK: usize = 16;
/// Most connections on the line port, and on the Redis port (each socket costs
/// `RX_BUF + TX_BUF` of heap once created; sockets are created as needed, never freed).
pub const MAX_LINE_CONNECTIONS: usize = 256;
pub const MAX_REDIS_CONNECTIONS: usize = 1024;
/// A connection with this much output queued reads no further requests until it drains.
const OUT_HIGH: usize = 32 << 10;
/// Most frames taken from the device per main-loop iteration.
const RX_BUDGET: usize = 128;
const RX_BUF: usize = 8 << 10;
const TX_BUF: usize = 16 << 10;

/// Which service a connection speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Line,
    Resp,
}

impl Proto {
    const ALL: [Proto; 2] = [Proto::Line, Proto::Resp];

    fn port(self) -> u16 {
        match self {
            Proto::Line => PORT,
            Proto::Resp => REDIS_PORT,
        }
    }

    fn max_connections(self) -> usize {
        match self {
            Proto::Line => MAX_LINE_CONNECTIONS,
            Proto::Resp => MAX_REDIS_CONNECTIONS,
        }
    }
}

struct Conn {
    handle: SocketHandle,
    proto: Proto,
    /// Bytes received and not yet a whole request.
    input: Vec<u8>,
    /// A line longer than the protocol allows is being skipped.
    too_long: bool,
    /// Replies not yet taken by the socket.
    output: Vec<u8>,
    /// Close once the output is out (a `QUIT`, a protocol error).
    closing: bool,
    established: bool,
}

impl Conn {
    fn reset(&mut self) {
        self.input.clear();
        self.output.clear();
        self.too_long = false;
        self.closing = false;
        self.established = false;
    }
}

/// The interface, its sockets and the per-connection line state.
pub struct Net {
    pub dev: VirtioNet,
    iface: Interface,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
    ip: Ipv4Address,
    config_seen: u64,
    /// Sequence number of the last network identity record applied (see [`crate::identity`]).
    identity_seen: u32,
    connections: u64,
    reply: Reply,
    /// Where a Redis reply is built before it is queued.
    scratch: Vec<u8>,
    pub gratuitous_arps: u64,
    reported_reset: bool,
    /// Added to the clock smoltcp sees: [`RTO_WARP_NS`] per configuration interrupt.
    warp_ns: u64,
}

/// How far smoltcp's clock jumps ahead on a configuration interrupt: its minimum
/// retransmission timeout (`RTTE_MIN_RTO`, 1 s in smoltcp 0.14). The interrupt means the
/// VM may have moved (a failover: the backup raises it right after the restore), and
/// whatever it sent since the last committed checkpoint died with the old host, so every
/// unacknowledged segment should go out again now rather than when its timer (≥ 1 s)
/// expires; smoltcp has no "retransmit now", but a clock past every first-time RTO is
/// exactly that. The only other cost is that keep-alives and idle timeouts come 1 s early.
const RTO_WARP_NS: u64 = 1_000_000_000;

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
        let sockets = SocketSet::new(Vec::new());
        let mut net = Net {
            dev,
            iface,
            sockets,
            conns: Vec::new(),
            ip,
            config_seen: irq_count(IRQ_CONFIG),
            identity_seen: Identity::current_seq(),
            connections: 0,
            reply: Reply::new(),
            scratch: vec![0; resp::MAX_REQUEST],
            gratuitous_arps: 0,
            reported_reset: false,
            warp_ns: 0,
        };
        net.keep_listening();
        net.announce();
        net
    }

    /// Tops every port up to `SPARE_LISTENERS` sockets in LISTEN (within its maximum).
    fn keep_listening(&mut self) {
        for proto in Proto::ALL {
            let (mut listening, mut total) = (0, 0);
            for c in self.conns.iter().filter(|c| c.proto == proto) {
                total += 1;
                if self.sockets.get::<tcp::Socket>(c.handle).state() == tcp::State::Listen {
                    listening += 1;
                }
            }
            while listening < SPARE_LISTENERS && total < proto.max_connections() {
                let mut s = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; RX_BUF]),
                    tcp::SocketBuffer::new(vec![0; TX_BUF]),
                );
                s.set_nagle_enabled(false);
                s.set_keep_alive(Some(Duration::from_secs(15)));
                s.set_timeout(Some(Duration::from_secs(60)));
                let _ = s.listen(proto.port());
                self.conns.push(Conn {
                    handle: self.sockets.add(s),
                    proto,
                    input: Vec::new(),
                    too_long: false,
                    output: Vec::new(),
                    closing: false,
                    established: false,
                });
                listening += 1;
                total += 1;
            }
        }
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

    /// Becomes the guest `id` names (a clone of a snapshot given its own MAC and address):
    /// the interface's MAC, address and default route change, and every connection of the
    /// old identity is reset (its peers knew another address; the listeners stay).
    fn take_identity(&mut self, id: &Identity) {
        let (m, ip) = (id.mac, id.ipv4_addr);
        crate::println!(
            "twin-guest: network identity {}: mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip={}.{}.{}.{}/{}",
            id.seq, m[0], m[1], m[2], m[3], m[4], m[5], ip[0], ip[1], ip[2], ip[3], id.prefix_len
        );
        self.dev.info.mac = id.mac;
        self.iface
            .set_hardware_addr(HardwareAddress::Ethernet(EthernetAddress(id.mac)));
        self.ip = Ipv4Address::from(id.ipv4_addr);
        let (addr, prefix) = (self.ip, id.prefix_len);
        self.iface.update_ip_addrs(|addrs| {
            addrs.clear();
            if !addr.is_unspecified() {
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(addr), prefix));
            }
        });
        self.iface.routes_mut().remove_default_ipv4_route();
        let gw = Ipv4Address::from(id.ipv4_gateway);
        if !gw.is_unspecified() {
            let _ = self.iface.routes_mut().add_default_ipv4_route(gw);
        }
        for c in self.conns.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if s.state() != tcp::State::Listen {
                s.abort();
            }
        }
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
            sockets: self.census(),
        }
    }

    fn census(&self) -> SocketCensus {
        let mut n = SocketCensus::default();
        for c in &self.conns {
            let s = self.sockets.get::<tcp::Socket>(c.handle);
            use tcp::State::*;
            match s.state() {
                Listen | Closed => n.listen += 1,
                SynSent | SynReceived => n.opening += 1,
                Established => n.established += 1,
                CloseWait | LastAck => n.peer_closed += 1,
                FinWait1 | FinWait2 | Closing | TimeWait => n.closing += 1,
            }
        }
        n
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
            if let Some(id) = Identity::read().filter(|id| id.seq != self.identity_seen) {
                self.identity_seen = id.seq;
                self.take_identity(&id);
            }
            self.announce();
            self.warp_ns += RTO_WARP_NS;
        }
        let (rx0, tx0) = (self.dev.rx.packets, self.dev.tx.packets);
        self.dev.tx.reclaim();
        let ts = instant(now_ns + self.warp_ns);
        self.iface.poll_maintenance(ts);
        // Bounded ingress, so a flood cannot starve the rest of the main loop.
        for i in 0..RX_BUDGET {
            // At most LISTEN_CHECK SYNs between two top-ups, fewer than SPARE_LISTENERS.
            if i % LISTEN_CHECK == 0 {
                self.keep_listening();
            }
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
        let ts = instant(now_ns + self.warp_ns);
        self.dev.tx.has_free()
            && matches!(self.iface.poll_at(ts, &self.sockets), Some(at) if at <= ts)
    }

    /// Reads whole requests from every connection and queues their replies.
    fn serve(&mut self, g: &mut Guest) -> bool {
        let stats = self.stats();
        let mut served = false;
        for c in self.conns.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if !s.is_open() {
                // Closed (peer reset, timed out, or finished): listen again.
                c.reset();
                let _ = s.listen(c.proto.port());
                continue;
            }
            if s.is_active() && !c.established && s.state() != tcp::State::SynReceived {
                c.established = true;
                self.connections += 1;
            }
            flush(s, &mut c.output);
            while c.output.len() < OUT_HIGH && !c.closing && s.can_recv() {
                let before = c.input.len();
                let _ = s.recv(|buf| {
                    c.input.extend_from_slice(buf);
                    (buf.len(), ())
                });
                if c.input.len() == before {
                    break;
                }
                served |= match c.proto {
                    Proto::Line => serve_lines(c, g, &stats, &mut self.reply),
                    Proto::Resp => serve_resp(c, g, &stats, &mut self.scratch),
                };
                flush(s, &mut c.output);
            }
            if c.closing && c.output.is_empty() {
                s.close();
            } else if s.state() == tcp::State::CloseWait && !s.can_recv() && c.output.is_empty() {
                // The peer is done sending; replies already queued still go out before our FIN.
                s.close();
            }
        }
        served
    }
}

/// Moves queued output into the socket's send buffer, as much as it takes.
fn flush(s: &mut tcp::Socket<'_>, out: &mut Vec<u8>) {
    if out.is_empty() {
        return;
    }
    if let Ok(n) = s.send_slice(out) {
        out.drain(..n);
    }
}

/// Line protocol: every complete line in the input is a request.
fn serve_lines(c: &mut Conn, g: &mut Guest, stats: &NetStats, reply: &mut Reply) -> bool {
    let mut served = false;
    let mut start = 0;
    while let Some(nl) = c.input[start..].iter().position(|&b| b == b'\n') {
        let line = &c.input[start..start + nl];
        let too_long = c.too_long || line.len() > MAX_LINE;
        reply.clear();
        g.handle(&line[..line.len().min(MAX_LINE)], too_long, stats, reply);
        c.output.extend_from_slice(reply.line());
        c.too_long = false;
        start += nl + 1;
        served = true;
    }
    c.input.drain(..start);
    if c.input.len() > MAX_LINE {
        // A line too long to keep: skip it up to its newline and say so then.
        c.too_long = true;
        c.input.clear();
    }
    served
}

/// Redis protocol: every complete request at the front of the input, in order.
fn serve_resp(c: &mut Conn, g: &mut Guest, stats: &NetStats, scratch: &mut [u8]) -> bool {
    let mut served = false;
    let mut used = 0;
    loop {
        if c.output.len() >= OUT_HIGH {
            break;
        }
        match resp::parse(&c.input[used..]) {
            Ok(None) => break,
            Ok(Some((args, n))) => {
                used += n;
                if args.is_empty() {
                    continue;
                }
                let mut w = resp::Writer::new(scratch);
                let after = g.handle_resp(&args, stats, &mut w);
                if w.overflowed() {
                    let mut e = resp::Writer::new(scratch);
                    e.error(b"ERR reply too large");
                    c.output.extend_from_slice(e.bytes());
                } else {
                    c.output.extend_from_slice(w.bytes());
                }
                served = true;
                if after == After::Close {
                    c.closing = true;
                    break;
                }
            }
            Err(e) => {
                let mut w = resp::Writer::new(scratch);
                w.error(e.message().as_bytes());
                c.output.extend_from_slice(w.bytes());
                c.closing = true;
                used = c.input.len();
                served = true;
                break;
            }
        }
    }
    c.input.drain(..used);
    served
}
