//! The state container: a versioned, checksummed, size-capped envelope around a bincode
//! payload. Used for state files on disk and state blobs on the replication wire.
//!
//! Layout (little-endian):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `TWINSTAT` |
//! | 8 | 4 | format version |
//! | 12 | 4 | payload kind |
//! | 16 | 8 | payload length |
//! | 24 | 8 | CRC-64/XZ of the payload |
//! | 32 | len | bincode payload |
//!
//! A reader refuses a newer version, a foreign kind, a length above its cap (before
//! allocating anything), a short read, a checksum mismatch and bytes after the payload.

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub const MAGIC: &[u8; 8] = b"TWINSTAT";
/// Current format version. Bump on any change of the payload types. 2: a vCPU's state
/// carries the CPUID it runs with (a version-1 state has none to restore, and is refused).
/// 3: the machine has disks (their sizes in the config, their devices in the states).
pub const FORMAT_VERSION: u32 = 3;
pub const HEADER_LEN: usize = 32;
/// Default cap on a payload: machine state is tens of KiB per vCPU.
pub const DEFAULT_MAX_PAYLOAD: u64 = 16 << 20;

/// What a container holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    MachineState = 1,
    SnapshotMeta = 2,
    /// The committed state of a replica store (`twin-store`).
    ReplicaState = 3,
}

/// Errors reading or writing a state container.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("state data is {0} bytes, shorter than the {HEADER_LEN}-byte header")]
    TooShort(usize),
    #[error("state data does not start with the TWINSTAT magic")]
    BadMagic,
    #[error("state format version {found} is newer than this build supports ({FORMAT_VERSION})")]
    NewerVersion { found: u32 },
    #[error("state format version {found} is older than this build supports ({FORMAT_VERSION})")]
    OlderVersion { found: u32 },
    #[error("state data holds kind {found}, expected {expected:?}")]
    WrongKind { found: u32, expected: Kind },
    #[error("state payload of {len} bytes exceeds the cap of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error("state data is truncated: header says {expected} payload bytes, {got} present")]
    Truncated { expected: u64, got: u64 },
    #[error("state data has {0} bytes after the payload")]
    TrailingBytes(u64),
    #[error("state checksum mismatch: header {expected:#018x}, payload {actual:#018x}")]
    Checksum { expected: u64, actual: u64 },
    #[error("state payload does not decode")]
    Decode(#[source] bincode::Error),
    #[error("state payload does not encode")]
    Encode(#[source] bincode::Error),
}

fn options(max: u64) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(max)
        .reject_trailing_bytes()
}

pub fn crc64(data: &[u8]) -> u64 {
    let mut d = crc64fast::Digest::new();
    d.write(data);
    d.sum64()
}

/// Encodes `value` into a container of `kind`.
pub fn encode<T: Serialize>(kind: Kind, value: &T) -> Result<Vec<u8>, ContainerError> {
    let payload = options(u64::MAX)
        .serialize(value)
        .map_err(ContainerError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(kind as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc64(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a container of `kind` whose payload is at most `max` bytes.
pub fn decode<T: DeserializeOwned>(data: &[u8], kind: Kind, max: u64) -> Result<T, ContainerError> {
    decode_payload(open(data, kind, max)?, max)
}

/// Checks the envelope of a container of `kind` (magic, version, kind, length, checksum)
/// and returns its payload, not yet decoded: for a reader that looks at the payload's
/// leading fields first (a snapshot's meta names its own format version there).
pub fn open(data: &[u8], kind: Kind, max: u64) -> Result<&[u8], ContainerError> {
    if data.len() < HEADER_LEN {
        return Err(ContainerError::TooShort(data.len()));
    }
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().expect("8 bytes"));
    if &data[..8] != MAGIC {
        return Err(ContainerError::BadMagic);
    }
    let version = u32_at(8);
    if version > FORMAT_VERSION {
        return Err(ContainerError::NewerVersion { found: version });
    }
    if version < FORMAT_VERSION {
        return Err(ContainerError::OlderVersion { found: version });
    }
    let found = u32_at(12);
    if found != kind as u32 {
        return Err(ContainerError::WrongKind {
            found,
            expected: kind,
        });
    }
    let len = u64_at(16);
    if len > max {
        return Err(ContainerError::TooLarge { len, max });
    }
    let got = (data.len() - HEADER_LEN) as u64;
    if got < len {
        return Err(ContainerError::Truncated { expected: len, got });
    }
    if got > len {
        return Err(ContainerError::TrailingBytes(got - len));
    }
    let payload = &data[HEADER_LEN..];
    let expected = u64_at(24);
    let actual = crc64(payload);
    if expected != actual {
        return Err(ContainerError::Checksum { expected, actual });
    }
    Ok(payload)
}

/// Decodes a payload [`open`] returned (at most `max` bytes of it are read).
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8], max: u64) -> Result<T, ContainerError> {
    options(max)
        .deserialize(payload)
        .map_err(ContainerError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Sample {
        a: u64,
        v: Vec<u8>,
        s: String,
    }

    fn sample() -> Sample {
        Sample {
            a: 7,
            v: vec![1, 2, 3],
            s: "x".into(),
        }
    }

    #[test]
    fn round_trip() {
        let b = encode(Kind::MachineState, &sample()).unwrap();
        let s: Sample = decode(&b, Kind::MachineState, 1 << 20).unwrap();
        assert_eq!(s, sample());
    }

    #[test]
    fn each_corruption_has_its_error() {
        let b = encode(Kind::MachineState, &sample()).unwrap();
        let d = |x: &[u8]| decode::<Sample>(x, Kind::MachineState, 1 << 20).unwrap_err();
        assert!(matches!(d(&b[..10]), ContainerError::TooShort(10)));
        assert!(matches!(
            d(&b[..b.len() - 1]),
            ContainerError::Truncated { .. }
        ));
        let mut t = b.clone();
        t.push(0);
        assert!(matches!(d(&t), ContainerError::TrailingBytes(1)));
        let mut m = b.clone();
        m[0] ^= 1;
        assert!(matches!(d(&m), ContainerError::BadMagic));
        let mut v = b.clone();
        v[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert!(
            matches!(d(&v), ContainerError::NewerVersion { found } if found == FORMAT_VERSION + 1)
        );
        // Version 1, before vCPU states held their CPUID: refused as older, by number.
        let mut v = b.clone();
        v[8..12].copy_from_slice(&1u32.to_le_bytes());
        let e = d(&v);
        assert!(
            matches!(e, ContainerError::OlderVersion { found: 1 }),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!("state format version 1 is older than this build supports ({FORMAT_VERSION})")
        );
        let mut k = b.clone();
        k[12] = 9;
        assert!(matches!(d(&k), ContainerError::WrongKind { found: 9, .. }));
        let mut f = b.clone();
        *f.last_mut().unwrap() ^= 0x40;
        assert!(matches!(d(&f), ContainerError::Checksum { .. }));
        let mut big = b.clone();
        big[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(d(&big), ContainerError::TooLarge { .. }));
        assert!(matches!(
            decode::<Sample>(&b, Kind::SnapshotMeta, 1 << 20),
            Err(ContainerError::WrongKind { .. })
        ));
    }

    #[test]
    fn a_checksummed_but_hostile_payload_is_refused() {
        // A valid envelope around a payload claiming a 2^60-byte vector.
        let mut payload = 7u64.to_le_bytes().to_vec();
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&(Kind::MachineState as u32).to_le_bytes());
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        b.extend_from_slice(&crc64(&payload).to_le_bytes());
        b.extend_from_slice(&payload);
        assert!(matches!(
            decode::<Sample>(&b, Kind::MachineState, 1 << 20),
            Err(ContainerError::Decode(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Sample>(&data, Kind::MachineState, 1 << 16);
        }

        #[test]
        fn any_single_bit_flip_is_detected(bit in 0usize..(8 * 64)) {
            let b = encode(Kind::MachineState, &sample()).unwrap();
            let bit = bit % (b.len() * 8);
            let mut m = b.clone();
            m[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode::<Sample>(&m, Kind::MachineState, 1 << 20).is_err());
        }

        #[test]
        fn any_truncation_is_detected(cut in 0usize..64) {
            let b = encode(Kind::MachineState, &sample()).unwrap();
            let cut = cut % b.len();
            prop_assert!(decode::<Sample>(&b[..cut], Kind::MachineState, 1 << 20).is_err());
        }
    }
}
