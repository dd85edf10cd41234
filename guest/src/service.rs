//! Request execution for the port-7000 service, and the guest state it reads.

use crate::arch::{irq_count, IRQ_CONFIG, IRQ_OTHER, IRQ_RX, IRQ_TIMER, IRQ_TX};
use crate::pagefmt::PageError;
use crate::proto::{self, Command};
use crate::time::Clock;
use crate::workload::Workload;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt::{self, Write};

/// Most keys the store holds.
pub const MAX_KEYS: usize = 1 << 18;
/// Heap left free when the store grows (so the network stack never runs out).
const HEAP_RESERVE: usize = 4 << 20;
/// Longest reply line, including the newline.
pub const MAX_REPLY: usize = 640;

/// Everything a request can see or change.
pub struct Guest {
    pub clock: Clock,
    pub workload: Workload,
    pub kv: BTreeMap<Vec<u8>, u64>,
    pub requests: u64,
    pub halts: u64,
    /// TSC ticks spent in the halt call (idle).
    pub halted_tsc: u64,
    pub loops: u64,
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
            Command::Incr(k) => match self.kv.get_mut(k) {
                Some(v) => match v.checked_add(1) {
                    Some(n) => {
                        *v = n;
                        write!(out, "{n}")
                    }
                    None => write!(out, "ERR value would overflow"),
                },
                None => self
                    .insert(k, 1, out)
                    .and_then(|ok| if ok { write!(out, "1") } else { Ok(()) }),
            },
            Command::Get(k) => write!(out, "{}", self.kv.get(k).copied().unwrap_or(0)),
            Command::Set(k, v) => match self.kv.get_mut(k) {
                Some(old) => {
                    *old = v;
                    write!(out, "OK")
                }
                None => {
                    self.insert(k, v, out)
                        .and_then(|ok| if ok { write!(out, "OK") } else { Ok(()) })
                }
            },
            Command::Ping => write!(out, "PONG"),
            Command::Time => write!(out, "{}", self.clock.now_ns()),
            Command::Stats => self.stats(net, out),
            Command::Verify => self.verify(out),
        };
    }

    /// Insert a new key; on refusal writes the `ERR` reply and returns `false`.
    fn insert(&mut self, k: &[u8], v: u64, out: &mut Reply) -> Result<bool, fmt::Error> {
        if self.kv.len() >= MAX_KEYS {
            write!(out, "ERR too many keys (limit {MAX_KEYS})")?;
            return Ok(false);
        }
        if crate::mem::heap_usage().1 < HEAP_RESERVE {
            write!(out, "ERR guest heap exhausted")?;
            return Ok(false);
        }
        self.kv.insert(k.to_vec(), v);
        Ok(true)
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
        )
    }

    fn verify(&mut self, out: &mut Reply) -> fmt::Result {
        let v = self.workload.verify();
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
