//! The network identity record at 0x7000: how a restored guest learns a new MAC and IPv4
//! address (a clone of a snapshot, `twin clone`), written by the VMM while no vCPU runs
//! and announced by the NIC's configuration interrupt.
//!
//! `BootInfo` is written once, before entry, and read through a `&'static` reference: it
//! cannot change. This record is never borrowed; it is copied out with one volatile read
//! each time the configuration interrupt fires, and applied when its sequence number
//! differs from the last one seen. At boot it is all zeroes (no record).

/// Where the VMM writes the record (between `BootInfo` and the CPL-0 stack).
pub const IDENTITY_ADDR: u64 = 0x7000;
/// Expected [`Identity::magic`].
pub const MAGIC: [u8; 8] = *b"TWINNETI";

/// The record (32 bytes, little-endian).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub magic: [u8; 8],
    /// Changes with every new identity; 0 never names one.
    pub seq: u32,
    pub _pad: u32,
    pub mac: [u8; 6],
    pub prefix_len: u8,
    pub _pad2: u8,
    pub ipv4_addr: [u8; 4],
    pub ipv4_gateway: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<Identity>() == 32);

impl Identity {
    /// The record as it is now: `None` if it holds none (wrong magic, sequence 0, a prefix
    /// longer than 32 or a multicast MAC).
    pub fn read() -> Option<Identity> {
        // SAFETY: IDENTITY_ADDR is guest RAM identity-mapped readable at CPL 3 (the boot
        // contract's page tables map [0, 4 GiB)), 8-aligned, and no Rust object overlaps
        // [0x7000, 0x7020) (BootInfo ends at 0x6478, the CPL-0 stack starts at 0x8000).
        // Every bit pattern is a valid `Identity` (integers and byte arrays). The read is
        // volatile because the VMM writes the page behind the compiler's back (only while
        // the vCPUs are stopped, so it is never torn).
        let id = unsafe { core::ptr::read_volatile(IDENTITY_ADDR as *const Identity) };
        (id.magic == MAGIC && id.seq != 0 && id.prefix_len <= 32 && id.mac[0] & 1 == 0)
            .then_some(id)
    }

    /// The sequence number of the record now, 0 if there is none.
    pub fn current_seq() -> u32 {
        Self::read().map_or(0, |id| id.seq)
    }
}
