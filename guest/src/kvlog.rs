//! The durable store's log on disk 0: its on-disk format.
//!
//! Pure `core` code: also compiled on the host by `twin-guest-image` (as `kvlog`), which
//! the end-to-end tests use to read and to tear disk images.
//!
//! Layout, in 512-byte sectors:
//! - sector 0: the label, [`LABEL`] then zeroes. A disk whose sector 0 is all zeroes is
//!   blank (the guest labels it); anything else is not the guest's, and it never writes it.
//! - from sector 1: records, each starting on a sector boundary and taking whole sectors
//!   (zero-padded), one after the other:
//!
//!   | offset | size | field |
//!   | --- | --- | --- |
//!   | 0 | 4 | magic [`RECORD_MAGIC`] (LE) |
//!   | 4 | 4 | payload length (LE) |
//!   | 8 | 8 | sequence number (LE): 1 for the first record, then +1 |
//!   | 16 | 4 | CRC-32 (IEEE) of bytes 0..16 and the payload (LE) |
//!   | 20 | 4 | zero (checked) |
//!   | 24 | len | payload: op (1 byte), then for SET key length (u16 LE), key, value length (u32 LE), value; for DEL key length, key; CLEAR nothing |
//!
//! A record never shares a sector with another, so writing one cannot damage a record
//! already acknowledged, whatever part of the write reaches the disk. The log ends at the
//! first sector that is all zeroes, or at a record that does not check (wrong magic,
//! length, checksum, sequence or payload): a torn tail, the write of a record that was
//! never acknowledged. It is dropped, never applied.

/// Bytes per sector.
pub const SECTOR: usize = 512;
/// Sector 0 of a disk holding a log.
pub const LABEL: &[u8; 16] = b"twin-kv-log v1\0\0";
/// First field of every record ("TWRK" in memory order).
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"TWRK");
/// Bytes of a record's header.
pub const HEADER: usize = 24;
/// Longest payload accepted (a 128-byte key and a 16 KiB value take 16523).
pub const MAX_PAYLOAD: usize = 32 << 10;

const OP_SET: u8 = 1;
const OP_DEL: u8 = 2;
const OP_CLEAR: u8 = 3;

/// One change of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op<'a> {
    Set(&'a [u8], &'a [u8]),
    Del(&'a [u8]),
    Clear,
}

/// What sector 0 says about a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Label {
    /// All zeroes: a new disk.
    Blank,
    /// Our label: a log follows.
    Log,
    /// Something else: not ours to write.
    Foreign,
}

/// Why a record does not check: where the log ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Torn {
    Magic,
    Length,
    /// The record runs past the end of the disk.
    PastEnd,
    /// The header's reserved field is not zero.
    Reserved,
    Checksum,
    Sequence {
        expected: u64,
        found: u64,
    },
    Payload,
}

impl Torn {
    pub fn name(self) -> &'static str {
        match self {
            Torn::Magic => "magic",
            Torn::Length => "length",
            Torn::PastEnd => "past-end",
            Torn::Reserved => "reserved",
            Torn::Checksum => "checksum",
            Torn::Sequence { .. } => "sequence",
            Torn::Payload => "payload",
        }
    }
}

/// What the sector at the log's position holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// All zeroes: the clean end of the log.
    End,
    /// A record header whose record takes `sectors` sectors (not yet checked beyond its
    /// length).
    Record { sectors: usize },
    /// Not a record: a torn tail (it takes at least this sector).
    Torn(Torn),
}

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32 (IEEE 802.3, reflected) continued from `crc` (start with 0).
pub fn crc32(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

fn le16(b: &[u8], o: usize) -> usize {
    usize::from(u16::from_le_bytes([b[o], b[o + 1]]))
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(w)
}

/// What a sector 0 is.
pub fn label(sector0: &[u8]) -> Label {
    if sector0.iter().all(|&b| b == 0) {
        Label::Blank
    } else if sector0.len() >= SECTOR
        && sector0[..LABEL.len()] == LABEL[..]
        && sector0[LABEL.len()..SECTOR].iter().all(|&b| b == 0)
    {
        Label::Log
    } else {
        Label::Foreign
    }
}

/// Fills `out` (one sector) with the label.
pub fn write_label(out: &mut [u8]) {
    out[..SECTOR].fill(0);
    out[..LABEL.len()].copy_from_slice(LABEL);
}

fn payload_len(op: &Op<'_>) -> usize {
    match op {
        Op::Set(k, v) => 1 + 2 + k.len() + 4 + v.len(),
        Op::Del(k) => 1 + 2 + k.len(),
        Op::Clear => 1,
    }
}

/// Bytes the record of `op` takes on disk (whole sectors); `None` if it is too large.
pub fn record_len(op: &Op<'_>) -> Option<usize> {
    let key = match op {
        Op::Set(k, _) | Op::Del(k) => k.len(),
        Op::Clear => 0,
    };
    let len = payload_len(op);
    (len <= MAX_PAYLOAD && key <= usize::from(u16::MAX))
        .then(|| (HEADER + len).div_ceil(SECTOR) * SECTOR)
}

/// Encodes the record of `op` with sequence number `seq` into `out`, padding included;
/// the bytes written (`record_len`), or `None` if it does not fit `out` or the format.
pub fn encode(seq: u64, op: &Op<'_>, out: &mut [u8]) -> Option<usize> {
    let total = record_len(op)?;
    if out.len() < total {
        return None;
    }
    let len = payload_len(op);
    let out = &mut out[..total];
    out.fill(0);
    out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    let p = &mut out[HEADER..HEADER + len];
    match op {
        Op::Set(k, v) => {
            p[0] = OP_SET;
            p[1..3].copy_from_slice(&(k.len() as u16).to_le_bytes());
            p[3..3 + k.len()].copy_from_slice(k);
            let at = 3 + k.len();
            p[at..at + 4].copy_from_slice(&(v.len() as u32).to_le_bytes());
            p[at + 4..].copy_from_slice(v);
        }
        Op::Del(k) => {
            p[0] = OP_DEL;
            p[1..3].copy_from_slice(&(k.len() as u16).to_le_bytes());
            p[3..].copy_from_slice(k);
        }
        Op::Clear => p[0] = OP_CLEAR,
    }
    let crc = crc32(crc32(0, &out[..16]), &out[HEADER..HEADER + len]);
    out[16..20].copy_from_slice(&crc.to_le_bytes());
    Some(total)
}

/// Reads the first sector of what may be a record; `sectors_left` is how many sectors
/// the disk has from this one on.
pub fn head(first: &[u8], sectors_left: u64) -> Head {
    if first[..SECTOR].iter().all(|&b| b == 0) {
        return Head::End;
    }
    if le32(first, 0) != RECORD_MAGIC {
        return Head::Torn(Torn::Magic);
    }
    let len = le32(first, 4) as usize;
    if len == 0 || len > MAX_PAYLOAD {
        return Head::Torn(Torn::Length);
    }
    let sectors = (HEADER + len).div_ceil(SECTOR);
    if sectors as u64 > sectors_left {
        return Head::Torn(Torn::PastEnd);
    }
    Head::Record { sectors }
}

/// Checks a whole record (`head` gave its size) and decodes its change.
pub fn decode(rec: &[u8], expected_seq: u64) -> Result<Op<'_>, Torn> {
    if rec.len() < HEADER || le32(rec, 0) != RECORD_MAGIC {
        return Err(Torn::Magic);
    }
    let len = le32(rec, 4) as usize;
    if len == 0 || len > MAX_PAYLOAD || HEADER + len > rec.len() {
        return Err(Torn::Length);
    }
    if le32(rec, 20) != 0 {
        return Err(Torn::Reserved);
    }
    let crc = crc32(crc32(0, &rec[..16]), &rec[HEADER..HEADER + len]);
    if crc != le32(rec, 16) {
        return Err(Torn::Checksum);
    }
    let seq = le64(rec, 8);
    if seq != expected_seq {
        return Err(Torn::Sequence {
            expected: expected_seq,
            found: seq,
        });
    }
    let p = &rec[HEADER..HEADER + len];
    let key = |p: &'_ [u8]| -> Option<usize> {
        let n = le16(p, 1);
        (p.len() >= 3 + n).then_some(3 + n)
    };
    match p[0] {
        OP_SET if p.len() >= 3 => {
            let kend = key(p).ok_or(Torn::Payload)?;
            if p.len() < kend + 4 {
                return Err(Torn::Payload);
            }
            let vlen = le32(p, kend) as usize;
            if p.len() != kend + 4 + vlen {
                return Err(Torn::Payload);
            }
            Ok(Op::Set(&p[3..kend], &p[kend + 4..]))
        }
        OP_DEL if p.len() >= 3 => {
            let kend = key(p).ok_or(Torn::Payload)?;
            if p.len() != kend {
                return Err(Torn::Payload);
            }
            Ok(Op::Del(&p[3..kend]))
        }
        OP_CLEAR if p.len() == 1 => Ok(Op::Clear),
        _ => Err(Torn::Payload),
    }
}
