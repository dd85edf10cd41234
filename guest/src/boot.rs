//! `BootInfo` (at 0x6000, written by the VMM) and its validation.

/// Where the VMM puts `BootInfo`.
pub const BOOT_INFO_ADDR: u64 = 0x6000;

/// The boot contract's `BootInfo`, version 1.
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
}

const _: () = assert!(core::mem::size_of::<BootInfo>() == 1072);

/// Expected `BootInfo::magic`.
pub const MAGIC: [u8; 8] = *b"TWINBOOT";
/// Expected `BootInfo::version`.
pub const VERSION: u32 = 1;

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
        // Rust object overlaps [0x6000, 0x6430): the image starts at 0x100000 and the CPL-0
        // stack is [0x8000, 0x10000).
        let b = unsafe { &*ptr };
        if b.magic != MAGIC {
            return Err("bad BootInfo magic (expected \"TWINBOOT\")");
        }
        if b.version != VERSION {
            return Err("unsupported BootInfo version (expected 1)");
        }
        if (b.size as usize) < core::mem::size_of::<BootInfo>() {
            return Err("BootInfo.size is smaller than the version-1 structure");
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

    /// The guest arguments (validated as UTF-8 by [`BootInfo::from_ptr`]).
    pub fn args(&self) -> &str {
        core::str::from_utf8(&self.args[..self.args_len as usize]).unwrap_or("")
    }
}
