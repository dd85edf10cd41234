//! Request execution for the two services — the port-7000 line protocol and the Redis
//! protocol on port 6379 — over one key-value store, and the guest state they read.

use crate::arch::{irq_count, IRQ_CONFIG, IRQ_OTHER, IRQ_RX, IRQ_TIMER, IRQ_TX};
use crate::kvlog::Op;
use crate::pagefmt::PageError;
use crate::proto::{self, Command};
use crate::resp;
use crate::store::{DiskLog, LogError};
use crate::time::Clock;
use crate::workload::Workload;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt::{self, Write};

/// Most keys the store holds.
pub const MAX_KEYS: usize = 1 << 18;
/// Longest value stored (a Redis client's `SET` may carry any bytes).
pub const MAX_VALUE: usize = 16 << 10;
/// Heap left free when the store grows (so the network stack never runs out).
const HEAP_RESERVE: usize = 4 << 20;
/// Longest reply line, including the newline.
pub const MAX_REPLY: usize = 1024;

/// Everything a request can see or change.
pub struct Guest {
    pub clock: Clock,
    pub workload: Workload,
    /// The store: values are byte strings (a decimal number for counters).
    pub kv: BTreeMap<Vec<u8>, Vec<u8>>,
    pub requests: u64,
    pub halts: u64,
    /// TSC ticks spent in the halt call (idle).
    pub halted_tsc: u64,
    pub loops: u64,
    /// Disk 0 as the store's log (`None`: no disk, the store is in memory only).
    pub disk: Option<DiskLog>,
    /// The disk workload (`disk=` guest argument), on the end of disk 0.
    pub diskload: Option<crate::diskload::DiskLoad>,
}

/// Network counters reported by `STATS`.
#[derive(Clone, Copy, Default)]
pub struct NetStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
    pub rx_kicks: u64,
    pub tx_kicks: u64,
    pub connections: u64,
    pub gratuitous_arps: u64,
    /// Sockets by TCP state, for `INFO` (a client that cannot connect wants to know why).
    pub sockets: SocketCensus,
}

/// How many of the guest's TCP sockets are in each state.
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketCensus {
    pub listen: u32,
    pub established: u32,
    /// SYN-RECEIVED: a handshake under way.
    pub opening: u32,
    /// CLOSE-WAIT, LAST-ACK: the peer closed first.
    pub peer_closed: u32,
    /// FIN-WAIT-1/2, CLOSING, TIME-WAIT: we closed first.
    pub closing: u32,
}

/// Why a store operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreError {
    TooManyKeys,
    HeapExhausted,
    ValueTooLong,
    /// `INCR` of a value that is not a decimal integer in range.
    NotAnInteger,
    /// `INCR` past the largest integer.
    Overflow,
    /// The log on disk 0 has no room for the change.
    DiskFull,
    /// Disk 0 is read-only: changes cannot be made durable, so they are refused.
    DiskReadOnly,
    /// Writing or flushing the change failed (the device answered an error).
    DiskIo,
}

impl StoreError {
    pub fn message(self) -> &'static str {
        match self {
            StoreError::TooManyKeys => "too many keys (limit 262144)",
            StoreError::HeapExhausted => "guest heap exhausted",
            StoreError::ValueTooLong => "value longer than 16384 bytes",
            StoreError::NotAnInteger => "value is not an integer or out of range",
            StoreError::Overflow => "increment or decrement would overflow",
            StoreError::DiskFull => "disk log full",
            StoreError::DiskReadOnly => "disk is read-only",
            StoreError::DiskIo => "disk I/O error (the change was not made)",
        }
    }
}

/// A decimal integer as Redis reads one: optional `-`, digits, in `i64`.
fn parse_i64(v: &[u8]) -> Option<i64> {
    let (neg, digits) = match v.split_first() {
        Some((b'-', d)) => (true, d),
        _ => (false, v),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: i64 = 0;
    for &b in digits {
        n = n.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
    }
    Some(if neg { -n } else { n })
}

fn decimal(n: i64) -> Vec<u8> {
    let mut s = alloc::string::String::new();
    let _ = write!(s, "{n}");
    s.into_bytes()
}

/// A fixed-size reply line.
pub struct Reply {
    buf: [u8; MAX_REPLY],
    len: usize,
}

impl Reply {
    pub fn new() -> Reply {
        Reply {
            buf: [0; MAX_REPLY],
            len: 0,
        }
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The line, newline included.
    pub fn line(&mut self) -> &[u8] {
        if self.len == MAX_REPLY {
            self.buf[MAX_REPLY - 1] = b'\n';
        } else {
            self.buf[self.len] = b'\n';
            self.len += 1;
        }
        &self.buf[..self.len]
    }
}

impl Reply {
    /// Appends raw bytes (a stored value), as much as fits.
    /// Appends `b` as one line's worth of text: a value set over RESP may hold any bytes,
    /// and a CR or LF in it would end the reply early and make the rest look like the next
    /// reply, so control bytes are written as `?`.
    pub fn write_bytes(&mut self, b: &[u8]) -> fmt::Result {
        let room = MAX_REPLY - 1 - self.len;
        let n = b.len().min(room);
        for (dst, &c) in self.buf[self.len..self.len + n].iter_mut().zip(b) {
            *dst = if c < 0x20 || c == 0x7f { b'?' } else { c };
        }
        self.len += n;
        Ok(())
    }
}

fn decimal_u64(n: u64) -> Vec<u8> {
    let mut s = alloc::string::String::new();
    let _ = write!(s, "{n}");
    s.into_bytes()
}

impl Write for Reply {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = MAX_REPLY - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl Guest {
    /// Execute one request line, writing the reply (without newline) into `out`.
    pub fn handle(&mut self, line: &[u8], too_long: bool, net: &NetStats, out: &mut Reply) {
        self.requests += 1;
        if too_long {
            let _ = write!(out, "ERR line longer than {} bytes", proto::MAX_LINE);
            return;
        }
        let cmd = match proto::parse(line) {
            Ok(c) => c,
            Err(why) => {
                let _ = write!(out, "ERR {why}");
                return;
            }
        };
        let _ = match cmd {
            Command::Incr(k) => match self.incr(k) {
                Ok(n) => write!(out, "{n}"),
                Err(StoreError::Overflow) => write!(out, "ERR value would overflow"),
                Err(e) => write!(out, "ERR {}", e.message()),
            },
            // A key never set reads as 0 on this protocol (its values are counters).
            Command::Get(k) => match self.kv.get(k) {
                Some(v) => out.write_bytes(v),
                None => write!(out, "0"),
            },
            Command::Set(k, v) => match self.set(k, &decimal_u64(v)) {
                Ok(()) => write!(out, "OK"),
                Err(e) => write!(out, "ERR {}", e.message()),
            },
            Command::Ping => write!(out, "PONG"),
            Command::Time => write!(out, "{}", self.clock.now_ns()),
            Command::Stats => self.stats(net, out),
            Command::Verify => self.verify(out),
        };
    }

    /// Sets `k` to `v`: checked, made durable on disk 0 (if there is one), then applied,
    /// so a change the disk refused is not made at all.
    pub fn set(&mut self, k: &[u8], v: &[u8]) -> Result<(), StoreError> {
        self.check_set(k, v)?;
        self.persist(Op::Set(k, v))?;
        self.apply_set(k, v);
        Ok(())
    }

    fn check_set(&self, k: &[u8], v: &[u8]) -> Result<(), StoreError> {
        if v.len() > MAX_VALUE {
            return Err(StoreError::ValueTooLong);
        }
        if self.kv.contains_key(k) {
            return Ok(());
        }
        if self.kv.len() >= MAX_KEYS {
            return Err(StoreError::TooManyKeys);
        }
        if crate::mem::heap_usage().1 < HEAP_RESERVE {
            return Err(StoreError::HeapExhausted);
        }
        Ok(())
    }

    fn apply_set(&mut self, k: &[u8], v: &[u8]) {
        if let Some(old) = self.kv.get_mut(k) {
            old.clear();
            old.extend_from_slice(v);
        } else {
            self.kv.insert(k.to_vec(), v.to_vec());
        }
    }

    /// Appends `op` to the log on disk 0 and flushes it (nothing without a disk).
    fn persist(&mut self, op: Op<'_>) -> Result<(), StoreError> {
        let Some(d) = self.disk.as_mut() else {
            return Ok(());
        };
        d.append(op).map_err(|e| match e {
            LogError::Full => StoreError::DiskFull,
            LogError::ReadOnly => StoreError::DiskReadOnly,
            LogError::TooLarge => StoreError::ValueTooLong,
            LogError::Io(_) => StoreError::DiskIo,
        })
    }

    /// Applies a change replayed from the log at boot (already durable); `false` if the
    /// store's limits refuse it.
    pub fn replay(&mut self, op: Op<'_>) -> bool {
        match op {
            Op::Set(k, v) => {
                if self.check_set(k, v).is_err() {
                    return false;
                }
                self.apply_set(k, v);
            }
            Op::Del(k) => {
                self.kv.remove(k);
            }
            Op::Clear => self.kv.clear(),
        }
        true
    }

    /// Removes every key.
    pub fn clear(&mut self) -> Result<(), StoreError> {
        self.persist(Op::Clear)?;
        self.kv.clear();
        Ok(())
    }

    /// Adds one to the integer at `k` (0 if absent); the new value.
    pub fn incr(&mut self, k: &[u8]) -> Result<i64, StoreError> {
        let n = match self.kv.get(k) {
            None => 0,
            Some(v) => parse_i64(v).ok_or(StoreError::NotAnInteger)?,
        };
        let n = n.checked_add(1).ok_or(StoreError::Overflow)?;
        self.set(k, &decimal(n))?;
        Ok(n)
    }

    /// Removes `k`; whether it was there.
    pub fn del(&mut self, k: &[u8]) -> Result<bool, StoreError> {
        if !self.kv.contains_key(k) {
            return Ok(false);
        }
        self.persist(Op::Del(k))?;
        Ok(self.kv.remove(k).is_some())
    }

    fn stats(&mut self, net: &NetStats, out: &mut Reply) -> fmt::Result {
        let (heap_used, heap_free) = crate::mem::heap_usage();
        write!(
            out,
            "uptime_ns={} requests={} keys={} dirty_pages_written={} wss_pages={} ticks={} \
             rx_irqs={} tx_irqs={} halts={}",
            self.clock.now_ns(),
            self.requests,
            self.kv.len(),
            self.workload.written,
            self.workload.pages(),
            irq_count(IRQ_TIMER),
            irq_count(IRQ_RX),
            irq_count(IRQ_TX),
            self.halts,
        )?;
        write!(
            out,
            " halted_ns={} config_irqs={} other_irqs={} loops={} dirty_rate={} pages_skipped={} \
             rx_packets={} tx_packets={} tx_dropped={} rx_kicks={} tx_kicks={} connections={} \
             gratuitous_arps={} heap_used={} heap_free={}",
            self.clock.ticks_to_ns(self.halted_tsc),
            irq_count(IRQ_CONFIG),
            irq_count(IRQ_OTHER),
            self.loops,
            self.workload.rate(),
            self.workload.skipped,
            net.rx_packets,
            net.tx_packets,
            net.tx_dropped,
            net.rx_kicks,
            net.tx_kicks,
            net.connections,
            net.gratuitous_arps,
            heap_used,
            heap_free,
        )?;
        match &self.disk {
            None => write!(out, " disk=none"),
            Some(d) => {
                if let Some(l) = &self.diskload {
                    write!(
                        out,
                        " dload_rate={} dload_blocks={} dload_written={} dload_flushes={} \
                         dload_skipped={} dload_errors={} dload_busy_ns={}",
                        l.rate(),
                        l.blocks(),
                        l.written,
                        l.flushes,
                        l.skipped,
                        l.errors,
                        l.busy_ns
                    )?;
                }
                write!(
                    out,
                    " disk={} disk_sectors={} log_sectors={} log_replayed={} log_torn={} \
                 log_torn_at={} log_refused={} log_appended={} disk_requests={} disk_errors={}",
                    d.mode.name(),
                    d.sectors(),
                    d.used_sectors(),
                    d.replay.records,
                    d.replay.torn.map_or("none", |(_, t)| t.name()),
                    d.replay.torn.map_or(0, |(at, _)| at),
                    d.replay.refused,
                    d.appended,
                    d.device().requests,
                    d.device().errors,
                )
            }
        }
    }

    /// Runs the disk workload's writes due by `now_ns`.
    pub fn disk_step(&mut self, now_ns: u64) -> bool {
        let (Some(load), Some(disk)) = (self.diskload.as_mut(), self.disk.as_mut()) else {
            return false;
        };
        let clock = &mut self.clock;
        load.step(now_ns, disk.device_mut(), || clock.now_ns())
    }

    fn verify(&mut self, out: &mut Reply) -> fmt::Result {
        let v = self.workload.verify();
        // The disk's blocks against the sequence numbers in memory (memory first: a
        // failure there is reported as before).
        let dv = match (v.first, self.diskload.as_mut(), self.disk.as_mut()) {
            (None, Some(load), Some(disk)) => Some((load.verify(disk.device_mut()), load.written)),
            _ => None,
        };
        if let Some((d, written)) = &dv {
            if d.io_error {
                return write!(out, "FAIL disk reason=io-error blocks={}", d.blocks);
            }
            if let Some((b, e, seq)) = d.first {
                write!(
                    out,
                    "FAIL disk_block={b} bad_blocks={} blocks={} ",
                    d.bad, d.blocks
                )?;
                return match e {
                    PageError::Index { found } => write!(out, "reason=index found={found}"),
                    PageError::Seq { found } => {
                        write!(out, "reason=seq expected={seq} found={found}")
                    }
                    PageError::NotZero => write!(out, "reason=unwritten-block-not-zero"),
                    PageError::Checksum { stored, computed } => write!(
                        out,
                        "reason=checksum seq={seq} stored={stored:#x} computed={computed:#x}"
                    ),
                };
            }
            return write!(
                out,
                "OK pages={} writes={} disk_blocks={} disk_writes={written}",
                v.pages, self.workload.written, d.blocks
            );
        }
        match v.first {
            None => write!(out, "OK pages={} writes={}", v.pages, self.workload.written),
            Some((i, e, seq)) => {
                write!(out, "FAIL page={i} bad_pages={} pages={} ", v.bad, v.pages)?;
                match e {
                    PageError::Index { found } => {
                        write!(out, "reason=index expected={i} found={found}")
                    }
                    PageError::Seq { found } => {
                        write!(out, "reason=seq expected={seq} found={found}")
                    }
                    PageError::NotZero => write!(out, "reason=unwritten-page-not-zero"),
                    PageError::Checksum { stored, computed } => write!(
                        out,
                        "reason=checksum seq={seq} stored={stored:#x} computed={computed:#x}"
                    ),
                }
            }
        }
    }
}

/// What the connection does after a Redis request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    Continue,
    /// `QUIT`: close once the reply is out.
    Close,
}

impl Guest {
    /// Executes one Redis request (RESP2), writing its reply.
    pub fn handle_resp(
        &mut self,
        a: &resp::Args<'_>,
        net: &NetStats,
        out: &mut resp::Writer<'_>,
    ) -> After {
        self.requests += 1;
        let rest = a.rest();
        let argc = rest.len();
        let wrong = |out: &mut resp::Writer<'_>, name: &str| {
            let mut m = alloc::string::String::new();
            let _ = write!(m, "ERR wrong number of arguments for '{name}' command");
            out.error(m.as_bytes());
        };
        let store_err = |out: &mut resp::Writer<'_>, e: StoreError| {
            let mut m = alloc::string::String::from("ERR ");
            m.push_str(e.message());
            out.error(m.as_bytes());
        };
        if a.is(b"PING") {
            match rest {
                [] => out.simple(b"PONG"),
                [msg] => out.bulk(msg),
                _ => wrong(out, "ping"),
            }
        } else if a.is(b"ECHO") {
            match rest {
                [msg] => out.bulk(msg),
                _ => wrong(out, "echo"),
            }
        } else if a.is(b"GET") {
            match rest {
                [k] => match self.kv.get(*k) {
                    Some(v) => out.bulk(v),
                    None => out.null(),
                },
                _ => wrong(out, "get"),
            }
        } else if a.is(b"SET") {
            match rest {
                [k, v] => match self.set(k, v) {
                    Ok(()) => out.simple(b"OK"),
                    Err(e) => store_err(out, e),
                },
                // Expiry and conditions (EX, PX, NX, XX, …) are not kept by this store.
                [_, _, ..] => out.error(b"ERR syntax error (SET options are not supported)"),
                _ => wrong(out, "set"),
            }
        } else if a.is(b"INCR") {
            match rest {
                [k] => match self.incr(k) {
                    Ok(n) => out.integer(n),
                    Err(e) => store_err(out, e),
                },
                _ => wrong(out, "incr"),
            }
        } else if a.is(b"DEL") || a.is(b"UNLINK") {
            if argc == 0 {
                wrong(out, "del");
            } else {
                let mut n = 0;
                let mut failed = None;
                for k in rest {
                    match self.del(k) {
                        Ok(true) => n += 1,
                        Ok(false) => {}
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match failed {
                    None => out.integer(n as i64),
                    Some(e) => store_err(out, e),
                }
            }
        } else if a.is(b"EXISTS") {
            if argc == 0 {
                wrong(out, "exists");
            } else {
                let n = rest.iter().filter(|k| self.kv.contains_key(**k)).count();
                out.integer(n as i64);
            }
        } else if a.is(b"MGET") {
            if argc == 0 {
                wrong(out, "mget");
            } else {
                out.array(argc);
                for k in rest {
                    match self.kv.get(*k) {
                        Some(v) => out.bulk(v),
                        None => out.null(),
                    }
                }
            }
        } else if a.is(b"MSET") {
            if argc == 0 || !argc.is_multiple_of(2) {
                wrong(out, "mset");
            } else {
                let mut failed = None;
                for kv in rest.chunks(2) {
                    if let Err(e) = self.set(kv[0], kv[1]) {
                        failed = Some(e);
                        break;
                    }
                }
                match failed {
                    None => out.simple(b"OK"),
                    Some(e) => store_err(out, e),
                }
            }
        } else if a.is(b"DBSIZE") {
            out.integer(self.kv.len() as i64);
        } else if a.is(b"FLUSHALL") || a.is(b"FLUSHDB") {
            match self.clear() {
                Ok(()) => out.simple(b"OK"),
                Err(e) => store_err(out, e),
            }
        } else if a.is(b"SELECT") {
            match rest {
                [db] if *db == b"0" => out.simple(b"OK"),
                [_] => out.error(b"ERR DB index is out of range"),
                _ => wrong(out, "select"),
            }
        } else if a.is(b"INFO") {
            let k = net.sockets;
            let mut s = alloc::string::String::new();
            let _ = write!(
                s,
                "# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\ntwin_guest:{}\r\n\
                 uptime_in_seconds:{}\r\n# Clients\r\nconnected_clients:{}\r\n# Stats\r\n\
                 total_connections_received:{}\r\ntotal_commands_processed:{}\r\n\
                 # Sockets\r\nsockets_listening:{}\r\nsockets_opening:{}\r\n\
                 sockets_established:{}\r\nsockets_peer_closed:{}\r\nsockets_closing:{}\r\n\
                 # Keyspace\r\ndb0:keys={},expires=0\r\n",
                crate::VERSION,
                self.clock.now_ns() / 1_000_000_000,
                k.established + k.peer_closed,
                net.connections,
                self.requests,
                k.listen,
                k.opening,
                k.established,
                k.peer_closed,
                k.closing,
                self.kv.len()
            );
            out.bulk(s.as_bytes());
        } else if a.is(b"CONFIG") {
            // redis-benchmark asks for `save` and `appendonly` before it starts. With a disk,
            // every change is appended to its log and flushed before the reply (`appendonly
            // yes`, `appendfsync always`); without one the replica on the backup keeps it.
            match rest {
                [sub, param] if sub.eq_ignore_ascii_case(b"GET") => {
                    let value: Option<&[u8]> = if param.eq_ignore_ascii_case(b"save") {
                        Some(b"")
                    } else if param.eq_ignore_ascii_case(b"appendonly") {
                        Some(
                            if self
                                .disk
                                .as_ref()
                                .is_some_and(|d| d.mode == crate::store::Mode::Log)
                            {
                                b"yes"
                            } else {
                                b"no"
                            },
                        )
                    } else {
                        None
                    };
                    match value {
                        Some(v) => {
                            out.array(2);
                            out.bulk(param);
                            out.bulk(v);
                        }
                        None => out.array(0),
                    }
                }
                _ => out.error(b"ERR only CONFIG GET save|appendonly is supported"),
            }
        } else if a.is(b"COMMAND") {
            // redis-cli asks for COMMAND DOCS on connecting: no documentation to give.
            out.array(0);
        } else if a.is(b"CLIENT") {
            // CLIENT SETNAME / SETINFO from client libraries: accepted, nothing kept.
            out.simple(b"OK");
        } else if a.is(b"QUIT") {
            out.simple(b"OK");
            return After::Close;
        } else {
            let mut m = alloc::string::String::from("ERR unknown command '");
            m.push_str(core::str::from_utf8(a.get(0).unwrap_or_default()).unwrap_or("?"));
            m.push('\'');
            out.error(m.as_bytes());
        }
        After::Continue
    }
}
