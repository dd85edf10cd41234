//! One virtio-blk request: a descriptor chain parsed and checked (virtio 1.2, 5.2.6).
//!
//! A chain is a 16-byte header (`type u32, reserved u32, sector u64`) the device reads,
//! then the data (read by the device for writes, discards and writes of zeroes, written
//! for reads and `GET_ID`), and last the one-byte status the device writes. The device
//! makes no assumption about how these are split over descriptors (the spec forbids it):
//! the readable descriptors are one byte stream and the writable ones another.
//!
//! Every address and length is checked here, in the vCPU thread, before a request
//! reaches the worker: a descriptor outside guest memory, a sector range past the end of
//! the disk, an oversized request, a write to a read-only disk get `IOERR`; an unknown
//! type or unknown flags `UNSUPP`; a chain without a writable byte for the status cannot
//! be answered and is returned with no bytes written.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk as vb;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::disk::SECTOR_SIZE;
use crate::GuestMem;

pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

/// Most segments of data in one request (offered as `seg_max`).
pub const SEG_MAX: u32 = 64;
/// Largest segment (offered as `size_max`).
pub const SIZE_MAX: u32 = 64 << 10;
/// Most data bytes in one request: `SEG_MAX` segments of `SIZE_MAX`.
pub const MAX_DATA: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Most ranges in one discard or write-zeroes request.
pub const MAX_RANGES: u32 = 32;
/// Most sectors in one range of a discard or write of zeroes.
pub const MAX_RANGE_SECTORS: u32 = u32::MAX >> 9;
/// Bytes the `GET_ID` answer has.
pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;
const HEADER_LEN: u64 = 16;
const RANGE_LEN: u64 = 16;

/// A piece of guest memory the request's data is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
}

/// A sector range of a discard or a write of zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub sector: u64,
    pub sectors: u32,
}

impl Range {
    pub fn offset(&self) -> u64 {
        self.sector * SECTOR_SIZE
    }
    pub fn bytes(&self) -> u64 {
        u64::from(self.sectors) * SECTOR_SIZE
    }
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Read { sector: u64, data: Vec<Segment> },
    Write { sector: u64, data: Vec<Segment> },
    Flush,
    GetId { data: Vec<Segment> },
    Discard(Vec<Range>),
    WriteZeroes(Vec<Range>),
}

/// A checked request, ready for the worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The chain's head descriptor: what the used ring returns.
    pub head: u16,
    pub op: Op,
    /// Where the status byte goes.
    pub status: u64,
}

impl Request {
    /// Bytes of data the request moves (reads and writes).
    pub fn data_len(&self) -> u64 {
        match &self.op {
            Op::Read { data, .. } | Op::Write { data, .. } | Op::GetId { data } => total(data),
            _ => 0,
        }
    }
}

/// A request answered at once, without the worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub head: u16,
    /// Where the status goes, when the chain has room for one.
    pub status_addr: Option<u64>,
    pub status: u8,
    pub why: String,
}

/// What the disk is, for the checks.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub capacity: u64,
    pub read_only: bool,
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// The bytes `[at, at + len)` of a stream of segments, as segments.
fn sub(segs: &[Segment], at: u64, len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    let end = at + len;
    for s in segs {
        let (s0, s1) = (pos, pos + u64::from(s.len));
        pos = s1;
        let (a, b) = (s0.max(at), s1.min(end));
        if a < b {
            out.push(Segment {
                addr: s.addr + (a - s0),
                len: (b - a) as u32,
            });
        }
    }
    out
}

/// Reads `buf.len()` bytes at `at` of a stream of segments (all in guest memory).
fn read_stream(mem: &GuestMem, segs: &[Segment], at: u64, buf: &mut [u8]) -> bool {
    let mut done = 0usize;
    for s in sub(segs, at, buf.len() as u64) {
        let n = s.len as usize;
        if mem
            .read_slice(&mut buf[done..done + n], GuestAddress(s.addr))
            .is_err()
        {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

fn in_range(limits: &Limits, sector: u64, bytes: u64) -> bool {
    sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|o| o.checked_add(bytes))
        .is_some_and(|end| end <= limits.capacity)
}

/// Parses the chain whose descriptors are `descs` (head `head`).
pub fn parse(
    mem: &GuestMem,
    head: u16,
    descs: impl IntoIterator<Item = Descriptor>,
    limits: &Limits,
) -> Result<Request, Rejected> {
    let mut readable = Vec::new();
    let mut writable: Vec<Segment> = Vec::new();
    let mut outside = None;
    let mut misordered = false;
    let mut count = 0u32;
    for d in descs {
        count += 1;
        let seg = Segment {
            addr: d.addr().0,
            len: d.len(),
        };
        if seg.len > 0 && !mem.check_range(GuestAddress(seg.addr), seg.len as usize) {
            outside.get_or_insert(seg);
        }
        if d.is_write_only() {
            writable.push(seg);
        } else {
            if !writable.is_empty() {
                misordered = true;
            }
            readable.push(seg);
        }
    }
    // The status is the last byte of the writable stream.
    let status_addr = writable
        .iter()
        .rev()
        .find(|s| s.len > 0)
        .map(|s| s.addr + u64::from(s.len) - 1)
        .filter(|&a| mem.check_range(GuestAddress(a), 1));
    let reject = |status: u8, why: String| Rejected {
        head,
        status_addr,
        status,
        why,
    };
    if misordered {
        return Err(reject(
            S_IOERR,
            "a device-readable descriptor follows a writable one".into(),
        ));
    }
    if let Some(s) = outside {
        return Err(reject(
            S_IOERR,
            format!(
                "descriptor [{:#x}, +{:#x}) is outside guest memory",
                s.addr, s.len
            ),
        ));
    }
    if count > SEG_MAX + 2 {
        return Err(reject(
            S_IOERR,
            format!("{count} descriptors, more than seg_max {SEG_MAX} + 2"),
        ));
    }
    let Some(status) = status_addr else {
        return Err(reject(S_IOERR, "no writable byte for the status".into()));
    };
    let mut header = [0u8; HEADER_LEN as usize];
    if total(&readable) < HEADER_LEN || !read_stream(mem, &readable, 0, &mut header) {
        return Err(reject(
            S_IOERR,
            "no 16-byte request header in the readable descriptors".into(),
        ));
    }
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let out_data = sub(&readable, HEADER_LEN, total(&readable) - HEADER_LEN);
    let in_data = sub(&writable, 0, total(&writable) - 1);
    let op = match kind {
        vb::VIRTIO_BLK_T_IN | vb::VIRTIO_BLK_T_OUT => {
            let write = kind == vb::VIRTIO_BLK_T_OUT;
            let data = if write { out_data } else { in_data };
            let len = total(&data);
            if len > MAX_DATA {
                return Err(reject(
                    S_IOERR,
                    format!("{len} bytes of data, more than {MAX_DATA}"),
                ));
            }
            if len % SECTOR_SIZE != 0 {
                return Err(reject(
                    S_IOERR,
                    format!("{len} bytes of data, not a multiple of a sector"),
                ));
            }
            if !in_range(limits, sector, len) {
                return Err(reject(
                    S_IOERR,
                    format!(
                        "sectors {sector}..+{} are past the end of the disk ({} sectors)",
                        len / SECTOR_SIZE,
                        limits.capacity / SECTOR_SIZE
                    ),
                ));
            }
            if write && limits.read_only {
                return Err(reject(S_IOERR, "write to a read-only disk".into()));
            }
            if write {
                Op::Write { sector, data }
            } else {
                Op::Read { sector, data }
            }
        }
        vb::VIRTIO_BLK_T_FLUSH => Op::Flush,
        vb::VIRTIO_BLK_T_GET_ID => Op::GetId { data: in_data },
        vb::VIRTIO_BLK_T_DISCARD | vb::VIRTIO_BLK_T_WRITE_ZEROES => {
            let zeroes = kind == vb::VIRTIO_BLK_T_WRITE_ZEROES;
            let bytes = total(&out_data);
            let n = bytes / RANGE_LEN;
            if bytes % RANGE_LEN != 0 || n == 0 || n > u64::from(MAX_RANGES) {
                return Err(reject(
                    S_IOERR,
                    format!("{bytes} bytes of ranges (1 to {MAX_RANGES} of 16 bytes each)"),
                ));
            }
            if limits.read_only {
                return Err(reject(
                    S_IOERR,
                    "discard or zeroes on a read-only disk".into(),
                ));
            }
            let mut ranges = Vec::with_capacity(n as usize);
            for i in 0..n {
                let mut r = [0u8; RANGE_LEN as usize];
                if !read_stream(mem, &out_data, i * RANGE_LEN, &mut r) {
                    return Err(reject(S_IOERR, "unreadable range".into()));
                }
                let sector = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
                let sectors = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
                let flags = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
                let allowed = if zeroes {
                    vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                if flags & !allowed != 0 {
                    return Err(reject(
                        S_UNSUPP,
                        format!("range flags {flags:#x} not supported"),
                    ));
                }
                if sectors > MAX_RANGE_SECTORS
                    || !in_range(limits, sector, u64::from(sectors) * SECTOR_SIZE)
                {
                    return Err(reject(
                        S_IOERR,
                        format!(
                            "range of sectors {sector}..+{sectors} is past the end of the disk"
                        ),
                    ));
                }
                ranges.push(Range { sector, sectors });
            }
            if zeroes {
                Op::WriteZeroes(ranges)
            } else {
                Op::Discard(ranges)
            }
        }
        other => return Err(reject(S_UNSUPP, format!("request type {other}"))),
    };
    Ok(Request { head, op, status })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn d(addr: u64, len: u32, write: bool) -> Descriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        Descriptor::new(addr, len, flags, 0)
    }

    fn header(m: &GuestMem, at: u64, kind: u32, sector: u64) {
        m.write_obj(kind, GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    const L: Limits = Limits {
        capacity: 1 << 20,
        read_only: false,
    };

    #[test]
    fn a_linux_style_read_and_a_split_write() {
        let m = mem();
        header(&m, 0x1000, vb::VIRTIO_BLK_T_IN, 8);
        let r = parse(
            &m,
            3,
            [
                d(0x1000, 16, false),
                d(0x2000, 4096, true),
                d(0x3000, 1, true),
            ],
            &L,
        )
        .unwrap();
        assert_eq!(r.head, 3);
        assert_eq!(r.status, 0x3000);
        assert_eq!(
            r.op,
            Op::Read {
                sector: 8,
                data: vec![Segment {
                    addr: 0x2000,
                    len: 4096
                }]
            }
        );
        // Header and data in one descriptor, data and status in another: same request.
        header(&m, 0x4000, vb::VIRTIO_BLK_T_OUT, 1);
        let r = parse(
            &m,
            0,
            [d(0x4000, 16 + 512, false), d(0x5000, 513, true)],
            &L,
        )
        .unwrap();
        assert_eq!(r.status, 0x5000 + 512);
        assert_eq!(
            r.op,
            Op::Write {
                sector: 1,
                data: vec![Segment {
                    addr: 0x4010,
                    len: 512
                }]
            }
        );
    }

    #[test]
    fn bad_requests_get_a_status_never_a_panic() {
        let m = mem();
        let status = |r: Result<Request, Rejected>| r.map(|_| S_OK).unwrap_or_else(|e| e.status);
        header(&m, 0x1000, vb::VIRTIO_BLK_T_IN, (1 << 20) / 512);
        assert_eq!(
            status(parse(
                &m,
                0,
                [d(0x1000, 16, false), d(0x2000, 513, true)],
                &L
            )),
            S_IOERR,
            "past the end"
        );
        header(&m, 0x1000, vb::VIRTIO_BLK_T_IN, u64::MAX / 2);
        assert_eq!(
            status(parse(
                &m,
                0,
                [d(0x1000, 16, false), d(0x2000, 513, true)],
                &L
            )),
            S_IOERR,
            "sector overflow"
        );
        header(&m, 0x1000, vb::VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            status(parse(
                &m,
                0,
                [d(0x1000, 16, false), d(0x2000, 101, true)],
                &L
            )),
            S_IOERR,
            "not whole sectors"
        );
        let e = parse(
            &m,
            0,
            [
                d(0x1000, 16, false),
                d(0xff_0000, 4096, true),
                d(0x3000, 1, true),
            ],
            &L,
        )
        .unwrap_err();
        assert_eq!((e.status, e.status_addr), (S_IOERR, Some(0x3000)));
        header(&m, 0x1000, 99, 0);
        assert_eq!(
            status(parse(&m, 0, [d(0x1000, 16, false), d(0x3000, 1, true)], &L)),
            S_UNSUPP
        );
        header(&m, 0x1000, vb::VIRTIO_BLK_T_OUT, 0);
        let ro = Limits {
            read_only: true,
            ..L
        };
        assert_eq!(
            status(parse(
                &m,
                0,
                [
                    d(0x1000, 16, false),
                    d(0x2000, 512, false),
                    d(0x3000, 1, true)
                ],
                &ro
            )),
            S_IOERR
        );
        let e = parse(&m, 0, [d(0x1000, 16, false)], &L).unwrap_err();
        assert_eq!(e.status_addr, None, "no room for a status");
        let e = parse(&m, 0, [d(0x1000, 4, false), d(0x3000, 1, true)], &L).unwrap_err();
        assert_eq!(e.status, S_IOERR, "short header");
        let e = parse(
            &m,
            0,
            [d(0x3000, 1, true), d(0x1000, 16, false), d(0x3000, 1, true)],
            &L,
        )
        .unwrap_err();
        assert_eq!(e.status, S_IOERR, "readable after writable");
        let many: Vec<_> = std::iter::once(d(0x1000, 16, false))
            .chain((0..70).map(|i| d(0x8000 + i * 512, 512, true)))
            .chain([d(0x3000, 1, true)])
            .collect();
        header(&m, 0x1000, vb::VIRTIO_BLK_T_IN, 0);
        assert_eq!(status(parse(&m, 0, many, &L)), S_IOERR, "too many segments");
    }

    #[test]
    fn discard_and_zeroes_ranges_are_checked() {
        let m = mem();
        let range = |at: u64, sector: u64, n: u32, flags: u32| {
            m.write_obj(sector, GuestAddress(at)).unwrap();
            m.write_obj(n, GuestAddress(at + 8)).unwrap();
            m.write_obj(flags, GuestAddress(at + 12)).unwrap();
        };
        header(&m, 0x1000, vb::VIRTIO_BLK_T_WRITE_ZEROES, 0);
        range(0x1010, 8, 16, 1);
        range(0x1020, 100, 8, 0);
        let r = parse(&m, 0, [d(0x1000, 48, false), d(0x3000, 1, true)], &L).unwrap();
        assert_eq!(
            r.op,
            Op::WriteZeroes(vec![
                Range {
                    sector: 8,
                    sectors: 16
                },
                Range {
                    sector: 100,
                    sectors: 8
                }
            ])
        );
        header(&m, 0x1000, vb::VIRTIO_BLK_T_DISCARD, 0);
        let e = parse(&m, 0, [d(0x1000, 48, false), d(0x3000, 1, true)], &L).unwrap_err();
        assert_eq!(e.status, S_UNSUPP, "unmap flag on a discard");
        range(0x1010, 2040, 16, 0);
        let e = parse(&m, 0, [d(0x1000, 32, false), d(0x3000, 1, true)], &L).unwrap_err();
        assert_eq!(e.status, S_IOERR, "past the end");
        let e = parse(&m, 0, [d(0x1000, 20, false), d(0x3000, 1, true)], &L).unwrap_err();
        assert_eq!(e.status, S_IOERR, "partial range");
    }
}
