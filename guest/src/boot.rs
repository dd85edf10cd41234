//! `BootInfo` (at 0x6000, written by the VMM) and its validation.

use crate::ram::{Spans, MAX_RANGES};

/// End of the MMIO hole below 4 GiB: RAM resumes here.
const MMIO_END: u64 = 1 << 32;

/// Where the VMM puts `BootInfo`.
pub const BOOT_INFO_ADDR: u64 = 0x6000;

/// The boot contract's `BootInfo`, version 2 (version 1 without the RAM ranges).
#[repr(C)]
pub struct BootInfo {
    pub magic: [u8; 8],
    pub version: u32,
    pub size: u32,
    pub mem_size: u64,
    pub tsc_khz: u64,
    pub ipv4_addr: [u8; 4],
    pub ipv4_prefix_len: u8,
    pub _pad: [u8; 3],
    pub ipv4_gateway: [u8; 4],
    pub args_len: u32,
    pub args: [u8; 1024],
    /// How many of `ram` are RAM ranges (at least one).
    pub ram_count: u32,
    pub _pad2: u32,
    /// `(base, size)` of each RAM range, in address order; the sizes add up to `mem_size`.
    pub ram: [[u64; 2]; MAX_RANGES],
}

const _: () = assert!(core::mem::size_of::<BootInfo>() == 1144);

/// Expected `BootInfo::magic`.
pub const MAGIC: [u8; 8] = *b"TWINBOOT";
/// Expected `BootInfo::version`.
pub const VERSION: u32 = 2;

impl BootInfo {
    /// Validate the structure at `ptr` (RDI at entry). Returns a description of the first
    /// problem. A `ptr` other than [`BOOT_INFO_ADDR`] is refused without being read.
    ///
    /// # Safety
    /// The `size_of::<BootInfo>()` bytes at [`BOOT_INFO_ADDR`] must be readable and
    /// nothing may write them for the rest of the guest's life (the boot contract).
    pub unsafe fn from_ptr(ptr: *const BootInfo) -> Result<&'static BootInfo, &'static str> {
        if ptr.is_null() || ptr as u64 != BOOT_INFO_ADDR {
            return Err("RDI does not point to BootInfo at 0x6000");
        }
        // SAFETY: `ptr` is BOOT_INFO_ADDR (checked above), whose bytes the caller guarantees
        // are readable and never written again, so a `&'static` to them is sound. 0x6000 is
        // aligned for BootInfo (8), and every field is an integer or a byte array, so any
        // bytes the VMM wrote there are a valid BootInfo (the checks below judge them). No
        // Rust object overlaps [0x6000, 0x6478): the image starts at 0x100000 and the CPL-0
        // stack is [0x8000, 0x10000).
        let b = unsafe { &*ptr };
        if b.magic != MAGIC {
            return Err("bad BootInfo magic (expected \"TWINBOOT\")");
        }
        if b.version != VERSION {
            return Err("unsupported BootInfo version (expected 2)");
        }
        if (b.size as usize) < core::mem::size_of::<BootInfo>() {
            return Err("BootInfo.size is smaller than the version-2 structure");
        }
        let ram = b.ram_spans()?;
        if ram.total() != b.mem_size {
            return Err("BootInfo.ram ranges do not add up to mem_size");
        }
        if ram
            .as_slice()
            .iter()
            .any(|s| s.base < MMIO_END && s.end() > crate::MMIO_START)
        {
            return Err("a BootInfo.ram range overlaps the MMIO hole");
        }
        if b.tsc_khz == 0 {
            return Err("BootInfo.tsc_khz is 0");
        }
        if b.args_len as usize > b.args.len() {
            return Err("BootInfo.args_len is larger than the args field");
        }
        if b.ipv4_prefix_len > 32 {
            return Err("BootInfo.ipv4_prefix_len is larger than 32");
        }
        if core::str::from_utf8(&b.args[..b.args_len as usize]).is_err() {
            return Err("BootInfo.args is not UTF-8");
        }
        Ok(b)
    }

    /// The RAM ranges (validated by [`BootInfo::from_ptr`]).
    pub fn ram_spans(&self) -> Result<Spans, &'static str> {
        let n = self.ram_count as usize;
        if n == 0 || n > MAX_RANGES {
            return Err("BootInfo.ram_count is 0 or larger than the ram field");
        }
        let mut list = [(0u64, 0u64); MAX_RANGES];
        for (l, r) in list.iter_mut().zip(&self.ram[..n]) {
            *l = (r[0], r[1]);
        }
        Spans::new(&list[..n])
            .map_err(|_| "BootInfo.ram ranges are not page-aligned, ordered and disjoint")
    }

    /// The guest arguments (validated as UTF-8 by [`BootInfo::from_ptr`]).
    pub fn args(&self) -> &str {
        core::str::from_utf8(&self.args[..self.args_len as usize]).unwrap_or("")
    }
}
