//! COM1 (8250 at 0x3F8), polled output from CPL 3.

use crate::arch::{inb, outb};
use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering};

const COM1: u16 = 0x3F8;
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 0x20;
/// Transmit FIFO depth of a 16550A.
const TX_FIFO: u32 = 16;

/// Bytes the transmit FIFO can still take without another look at the LSR.
static TX_FREE: AtomicU32 = AtomicU32::new(0);

/// Write one byte. Like Linux's 8250 driver, wait (bounded) for THR-empty and then fill the
/// 16-byte FIFO: every port access is a VM exit (~60 µs from CPL 3 here), and polling the
/// LSR before every byte made the boot banner half of the time to the first TCP reply.
pub fn put_byte(b: u8) {
    if TX_FREE.load(Ordering::Relaxed) == 0 {
        for _ in 0..100_000 {
            if inb(LSR) & LSR_THR_EMPTY != 0 {
                break;
            }
        }
        TX_FREE.store(TX_FIFO, Ordering::Relaxed);
    }
    TX_FREE.fetch_sub(1, Ordering::Relaxed);
    outb(COM1, b);
}

/// `core::fmt` adapter; turns `\n` into `\r\n`.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if b == b'\n' {
                put_byte(b'\r');
            }
            put_byte(b);
        }
        Ok(())
    }
}

/// Print to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::serial::Serial, format_args!($($arg)*));
    }};
}

/// Print a line to COM1.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        $crate::print!($($arg)*);
        $crate::print!("\n");
    }};
}

/// A request console on COM1 speaking the port-7000 line protocol (for tests and for
/// debugging without a network). Polled once per timer tick, so it costs one port read
/// (one VM exit) per tick when idle.
pub struct Console {
    line: [u8; crate::proto::MAX_LINE],
    len: usize,
    too_long: bool,
    last_tick: u64,
    reply: crate::service::Reply,
}

impl Console {
    pub fn new() -> Console {
        Console {
            line: [0; crate::proto::MAX_LINE],
            len: 0,
            too_long: false,
            last_tick: 0,
            reply: crate::service::Reply::new(),
        }
    }

    /// Read what COM1 has received (at most once per timer tick) and answer complete lines.
    pub fn poll(&mut self, g: &mut crate::service::Guest, net: &crate::service::NetStats) -> bool {
        let tick = crate::arch::irq_count(crate::arch::IRQ_TIMER);
        if tick == self.last_tick {
            return false;
        }
        self.last_tick = tick;
        let mut served = false;
        for _ in 0..256 {
            if inb(LSR) & 1 == 0 {
                break;
            }
            let b = inb(COM1);
            match b {
                b'\n' | b'\r' => {
                    if self.len == 0 && !self.too_long {
                        continue;
                    }
                    self.reply.clear();
                    g.handle(&self.line[..self.len], self.too_long, net, &mut self.reply);
                    for &c in self.reply.line() {
                        if c == b'\n' {
                            put_byte(b'\r');
                        }
                        put_byte(c);
                    }
                    self.len = 0;
                    self.too_long = false;
                    served = true;
                }
                _ if self.len < self.line.len() => {
                    self.line[self.len] = b;
                    self.len += 1;
                }
                _ => self.too_long = true,
            }
        }
        served
    }
}
