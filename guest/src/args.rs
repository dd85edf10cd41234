//! `--guest-args` parsing: `key=value` items separated by commas or spaces.
//!
//! Pure `core` code: also compiled into host unit tests by `twin-guest-image`.

use core::fmt;

/// Page size of the workload.
pub const PAGE: u64 = 4096;

/// Default working-set size: 64 MiB.
pub const DEFAULT_WSS: u64 = 64 << 20;
/// Default disk working-set size: 16 MiB.
pub const DEFAULT_DWSS: u64 = 16 << 20;
/// Largest disk workload block (one virtio-blk request).
pub const MAX_DBLOCK: u64 = 64 << 10;
/// Default timer frequency.
pub const DEFAULT_HZ: u32 = 100;
/// Highest timer frequency accepted.
pub const MAX_HZ: u32 = 10_000;

/// Order in which the workload writes the pages of its working set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Round-robin: page 0, 1, 2, … then wrap.
    Sequential,
    /// Pseudo-random (a fixed-seed xorshift generator), with repeats.
    Random,
}

/// What the workload's writes put in a page (`wdata`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteData {
    /// Incompressible (the default, and the only kind before `wdata`).
    Random,
    /// Text-like: compresses about threefold.
    Text,
}

/// The parsed guest arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestArgs {
    /// Workload write rate in bytes per second (0 = workload off).
    pub dirty_bytes_per_sec: u64,
    /// Working-set size in bytes (a multiple of [`PAGE`]).
    pub wss_bytes: u64,
    /// Guest physical address where the working set starts (a multiple of [`PAGE`]); it
    /// runs on through the RAM ranges, skipping the MMIO hole. `None`: the top of RAM.
    pub wss_base: Option<u64>,
    /// LAPIC timer frequency.
    pub hz: u32,
    /// Page order of the workload.
    pub pattern: Pattern,
    /// Percent of a page's body one write of the workload changes (1–100; 100: all of
    /// it, the default).
    pub wfrac: u8,
    /// What those writes put there.
    pub wdata: WriteData,
    /// Serve the line protocol on COM1 too (polled once per timer tick: one VM exit per
    /// tick, so off by default).
    pub console: bool,
    /// Disk workload write rate in bytes per second (0 = off), on disk 0.
    pub disk_bytes_per_sec: u64,
    /// Its working set: the last `dwss` bytes of disk 0 (a multiple of `dblock`).
    pub dwss_bytes: u64,
    /// Bytes per disk write (a multiple of [`PAGE`], at most [`MAX_DBLOCK`]).
    pub dblock_bytes: u64,
    /// A FLUSH after every this many block writes (at least 1).
    pub dflush: u64,
    /// Bytes of heap written once at boot and never again: memory a VM has touched and
    /// then left cold (the part of a replica a restore should load last, or never).
    pub cold_bytes: u64,
}

impl Default for GuestArgs {
    fn default() -> Self {
        GuestArgs {
            dirty_bytes_per_sec: 0,
            wss_bytes: DEFAULT_WSS,
            wss_base: None,
            hz: DEFAULT_HZ,
            pattern: Pattern::Sequential,
            wfrac: 100,
            wdata: WriteData::Random,
            console: false,
            disk_bytes_per_sec: 0,
            dwss_bytes: DEFAULT_DWSS,
            dblock_bytes: PAGE,
            dflush: 1,
            cold_bytes: 0,
        }
    }
}

/// Why the arguments were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgError<'a> {
    /// An item without `=`.
    NotKeyValue(&'a str),
    /// A key this guest does not know.
    UnknownKey(&'a str),
    /// A known key with a value that does not parse or is out of range.
    BadValue {
        key: &'a str,
        value: &'a str,
        why: &'static str,
    },
}

impl fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::NotKeyValue(item) => {
                write!(f, "guest argument {item:?} is not of the form key=value")
            }
            ArgError::UnknownKey(key) => write!(
                f,
                "unknown guest argument {key:?} (known: dirty=<rate>/s, wss=<size>, wssbase=<address>, hz=<n>, pattern=seq|random, wfrac=<1-100>, wdata=random|text, cold=<size>, console=on|off, disk=<rate>/s, dwss=<size>, dblock=<size>, dflush=<n>)"
            ),
            ArgError::BadValue { key, value, why } => {
                write!(f, "bad value {value:?} for guest argument {key}: {why}")
            }
        }
    }
}

/// Parse a size such as `4096`, `64K`, `128M`, `1G`, `2GiB` (binary multiples).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits_end = s
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    if digits_end == 0 {
        return None;
    }
    let mut n: u64 = 0;
    for b in s[..digits_end].bytes() {
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    let mut rest = &s.as_bytes()[digits_end..];
    let shift = match rest.first().map(u8::to_ascii_uppercase) {
        None => 0,
        Some(b'K') => 10,
        Some(b'M') => 20,
        Some(b'G') => 30,
        Some(b'T') => 40,
        Some(b'B') => 0,
        Some(_) => return None,
    };
    if shift != 0 {
        rest = &rest[1..];
        if rest.first() == Some(&b'i') {
            rest = &rest[1..];
        }
    }
    if matches!(rest.first(), Some(b'B') | Some(b'b')) {
        rest = &rest[1..];
    }
    if !rest.is_empty() {
        return None;
    }
    if shift != 0 && n.leading_zeros() < shift {
        return None;
    }
    Some(n << shift)
}

/// Parse the whole argument string.
pub fn parse(args: &str) -> Result<GuestArgs, ArgError<'_>> {
    let mut out = GuestArgs::default();
    for item in args.split([',', ' ', '\t', '\n']) {
        if item.is_empty() {
            continue;
        }
        let Some((key, value)) = item.split_once('=') else {
            return Err(ArgError::NotKeyValue(item));
        };
        let bad = |why| ArgError::BadValue { key, value, why };
        match key {
            "dirty" => {
                let rate = value.strip_suffix("/s").unwrap_or(value);
                out.dirty_bytes_per_sec =
                    parse_size(rate).ok_or(bad("expected bytes per second, e.g. 64M/s"))?;
            }
            "wss" => {
                let size = parse_size(value).ok_or(bad("expected a size, e.g. 128M"))?;
                out.wss_bytes = size.checked_add(PAGE - 1).ok_or(bad("too large"))? / PAGE * PAGE;
            }
            "wssbase" => {
                let base = parse_size(value).ok_or(bad("expected an address, e.g. 2816M"))?;
                if base % PAGE != 0 {
                    return Err(bad("must be a multiple of 4K"));
                }
                out.wss_base = Some(base);
            }
            "hz" => {
                let hz = parse_size(value).ok_or(bad("expected a frequency in Hz, e.g. 100"))?;
                if hz == 0 || hz > u64::from(MAX_HZ) {
                    return Err(bad("must be between 1 and 10000"));
                }
                out.hz = hz as u32;
            }
            "pattern" => {
                out.pattern = match value {
                    "seq" | "sequential" => Pattern::Sequential,
                    "rand" | "random" => Pattern::Random,
                    _ => return Err(bad("expected seq or random")),
                };
            }
            "wfrac" => {
                let pct = value.strip_suffix('%').unwrap_or(value);
                match parse_size(pct) {
                    Some(p @ 1..=100) => out.wfrac = p as u8,
                    _ => return Err(bad("expected a percentage of a page, 1 to 100")),
                }
            }
            "wdata" => {
                out.wdata = match value {
                    "random" | "rand" => WriteData::Random,
                    "text" => WriteData::Text,
                    _ => return Err(bad("expected random or text")),
                };
            }
            "console" => {
                out.console = match value {
                    "on" | "1" | "yes" => true,
                    "off" | "0" | "no" => false,
                    _ => return Err(bad("expected on or off")),
                };
            }
            "disk" => {
                let rate = value.strip_suffix("/s").unwrap_or(value);
                out.disk_bytes_per_sec =
                    parse_size(rate).ok_or(bad("expected bytes per second, e.g. 8M/s"))?;
            }
            "cold" => {
                let size = parse_size(value).ok_or(bad("expected a size, e.g. 128M"))?;
                out.cold_bytes = size.checked_add(PAGE - 1).ok_or(bad("too large"))? / PAGE * PAGE;
            }
            "dwss" => {
                out.dwss_bytes = parse_size(value).ok_or(bad("expected a size, e.g. 64M"))?;
            }
            "dblock" => {
                let b = parse_size(value).ok_or(bad("expected a size, e.g. 4K"))?;
                if b == 0 || b % PAGE != 0 || b > MAX_DBLOCK {
                    return Err(bad("must be a multiple of 4K, at most 64K"));
                }
                out.dblock_bytes = b;
            }
            "dflush" => {
                let n = parse_size(value).ok_or(bad("expected a count, e.g. 1"))?;
                if n == 0 {
                    return Err(bad("must be at least 1 (a FLUSH after every n writes)"));
                }
                out.dflush = n;
            }
            _ => return Err(ArgError::UnknownKey(key)),
        }
    }
    // Whole blocks (rounded down); a disk workload needs at least one.
    out.dwss_bytes = out.dwss_bytes / out.dblock_bytes * out.dblock_bytes;
    if out.disk_bytes_per_sec > 0 && out.dwss_bytes == 0 {
        return Err(ArgError::BadValue {
            key: "dwss",
            value: "0",
            why: "the disk workload (disk > 0) needs a working set of at least one block",
        });
    }
    if out.dirty_bytes_per_sec > 0 && out.wss_bytes == 0 {
        return Err(ArgError::BadValue {
            key: "wss",
            value: "0",
            why: "the workload (dirty > 0) needs a working set of at least one page",
        });
    }
    Ok(out)
}
