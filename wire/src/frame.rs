//! The fixed frame header.
//!
//! ```text
//! offset size field
//!      0    4 magic          b"TWIN"
//!      4    1 frame type     see `FrameType`
//!      5    1 flags          0 in protocol version 1
//!      6    2 reserved       0
//!      8    4 payload length u32 LE, at most the decoder's cap
//!     12    8 payload crc64  u64 LE, CRC-64/XZ of the payload
//!     20    4 header check   u32 LE, low 32 bits of CRC-64/XZ of bytes 0..20
//! ```
//!
//! The header check exists so that a corrupted length is caught at once instead of making the
//! receiver wait for (and buffer) up to the cap of bytes that will never form a frame.

/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 24;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"TWIN";

/// Default cap on a frame's payload length, checked before anything is allocated.
pub const DEFAULT_MAX_FRAME_LEN: u32 = 64 << 20;

/// A parsed, header-checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Raw frame type byte (may be unknown to this build).
    pub frame_type: u8,
    /// Flags byte.
    pub flags: u8,
    /// Payload length in bytes.
    pub payload_len: u32,
    /// CRC-64/XZ of the payload.
    pub payload_crc: u64,
}

/// A header that cannot be trusted. Every variant means the byte stream has lost frame
/// synchronisation: the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The stream does not start with [`MAGIC`].
    #[error("bad magic {found:02x?}, expected {MAGIC:02x?}")]
    BadMagic {
        /// The four bytes found instead.
        found: [u8; 4],
    },
    /// The header check does not match the header bytes.
    #[error("header check mismatch: header says {expected:#010x}, computed {computed:#010x}")]
    HeaderChecksum {
        /// Value carried in the header.
        expected: u32,
        /// Value computed over the header bytes.
        computed: u32,
    },
    /// Flags or reserved bits this version does not define are set.
    #[error("unsupported flags {flags:#04x} / reserved {reserved:#06x}")]
    ReservedBits {
        /// The flags byte.
        flags: u8,
        /// The reserved field.
        reserved: u16,
    },
}

pub(crate) fn crc64(data: &[u8]) -> u64 {
    let mut d = crc64fast::Digest::new();
    d.write(data);
    d.sum64()
}

fn header_check(bytes: &[u8]) -> u32 {
    // Truncation is deliberate: 32 bits are plenty to detect a corrupted 20-byte header.
    crc64(&bytes[..20]) as u32
}

impl FrameHeader {
    /// Whether `prefix` (at least 4 bytes) could be the start of a frame.
    pub(crate) fn check_magic(prefix: &[u8]) -> Result<(), HeaderError> {
        let found: [u8; 4] = [prefix[0], prefix[1], prefix[2], prefix[3]];
        if found == MAGIC {
            Ok(())
        } else {
            Err(HeaderError::BadMagic { found })
        }
    }

    /// Parse and check the first [`HEADER_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self, HeaderError> {
        Self::check_magic(bytes)?;
        let expected = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        let computed = header_check(bytes);
        if expected != computed {
            return Err(HeaderError::HeaderChecksum { expected, computed });
        }
        let flags = bytes[5];
        let reserved = u16::from_le_bytes([bytes[6], bytes[7]]);
        if flags != 0 || reserved != 0 {
            return Err(HeaderError::ReservedBits { flags, reserved });
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&bytes[8..12]);
        let mut crc = [0u8; 8];
        crc.copy_from_slice(&bytes[12..20]);
        Ok(Self {
            frame_type: bytes[4],
            flags,
            payload_len: u32::from_le_bytes(len),
            payload_crc: u64::from_le_bytes(crc),
        })
    }

    /// Serialise the header, computing its header check.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = self.frame_type;
        out[5] = self.flags;
        out[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        out[12..20].copy_from_slice(&self.payload_crc.to_le_bytes());
        let check = header_check(&out);
        out[20..24].copy_from_slice(&check.to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FrameHeader {
        FrameHeader {
            frame_type: 9,
            flags: 0,
            payload_len: 12345,
            payload_crc: 0x0123_4567_89ab_cdef,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        assert_eq!(FrameHeader::parse(&h.to_bytes()), Ok(h));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = sample().to_bytes();
        for bit in 0..HEADER_LEN * 8 {
            let mut b = bytes;
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(FrameHeader::parse(&b).is_err(), "bit {bit} undetected");
        }
    }

    #[test]
    fn bad_magic_is_reported_first() {
        let mut b = sample().to_bytes();
        b[0] = b'X';
        assert_eq!(
            FrameHeader::parse(&b),
            Err(HeaderError::BadMagic { found: *b"XWIN" })
        );
    }

    #[test]
    fn reserved_bits_are_rejected() {
        let mut h = sample();
        h.flags = 1;
        assert_eq!(
            FrameHeader::parse(&h.to_bytes()),
            Err(HeaderError::ReservedBits {
                flags: 1,
                reserved: 0
            })
        );
    }
}
