//! Guest physical address layout of the built-in guest (see ARCHITECTURE.md, "boot contract").

pub const GDT_ADDR: u64 = 0x1000;
pub const IDT_ADDR: u64 = 0x2000;
pub const TSS_ADDR: u64 = 0x3000;
/// 64-bit TSS (0x68 bytes) followed by the I/O permission bitmap and its terminator byte.
pub const TSS_SIZE: u64 = 0x68 + 8192 + 1;
pub const BOOT_INFO_ADDR: u64 = 0x6000;
/// The network identity record (32 bytes): a new MAC and IPv4 address for a restored guest
/// (a clone), see [`crate::boot::write_identity`].
pub const IDENTITY_ADDR: u64 = 0x7000;
/// RSP0 in the TSS: interrupts taken at CPL 3 switch to this stack.
pub const KERNEL_STACK_TOP: u64 = 0x10000;
pub const PML4_ADDR: u64 = 0x10000;
/// One page-directory-pointer table: 512 GiB of identity map.
pub const PDPT_ADDR: u64 = 0x11000;
/// The page directories, one per GiB of the identity map (2 MiB pages), consecutive from
/// here: GiB `n` at `PD_ADDR + n × 4096`. Four for the first 4 GiB (RAM and the MMIO hole),
/// one more per GiB of RAM above 4 GiB; they must end by [`IMAGE_BASE`].
pub const PD_ADDR: u64 = 0x12000;
/// Lowest address a guest image may load at.
pub const IMAGE_BASE: u64 = 0x100000;
/// Most guest-physical space the page directories between [`PD_ADDR`] and [`IMAGE_BASE`]
/// can map: 238 GiB.
pub const IDENTITY_MAP_MAX: u64 = (IMAGE_BASE - PD_ADDR) / 4096 * (1 << 30);

/// RAM below 4 GiB ends here; the top GiB of the 32-bit space holds MMIO.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// RAM past the first 3 GiB continues here, above the MMIO hole (see
/// [`crate::memory::RamMap`]).
pub const HIGH_RAM_START: u64 = 1 << 32;
/// PCI BARs are assigned from this window.
pub const PCI_MMIO_START: u64 = 0xC000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
pub const IOAPIC_ADDR: u64 = 0xFEC0_0000;
pub const LAPIC_ADDR: u64 = 0xFEE0_0000;

pub const COM1_PORT: u64 = 0x3F8;
/// The 8250's eight registers.
pub const COM1_PORT_SIZE: u64 = 8;
pub const COM1_IRQ: u32 = 4;
/// A byte written here powers the VM off with that exit status.
pub const POWER_PORT: u64 = 0x501;
pub const POWER_PORT_SIZE: u64 = 1;
pub const PCI_CONFIG_PORT: u64 = 0xCF8;
pub const PCI_CONFIG_PORT_SIZE: u64 = 8;
