//! The built-in guest, built from `guest/` and embedded as an ELF image.
//!
//! `guest/` is a separate `no_std` workspace (it needs `panic = "abort"`); this crate's
//! build script builds it with the host toolchain and embeds the result. The VMM loads it
//! per the boot contract in ARCHITECTURE.md ("The built-in guest and its boot contract").

#[repr(C, align(4096))]
struct PageAligned<T: ?Sized>(T);

static ELF: &PageAligned<[u8]> =
    &PageAligned(*include_bytes!(concat!(env!("OUT_DIR"), "/twin-guest.elf")));

/// The guest's ELF image (static, non-PIE x86-64 executable linked at 0x100000, whose
/// first loaded bytes are the guest header).
pub static GUEST_ELF: &[u8] = &ELF.0;

/// Guest physical address the image is linked at (the guest header is there).
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Exit statuses the guest writes to the power-off port 0x501.
pub mod exit_status {
    /// Bad `BootInfo` or guest arguments (the guest prints the reason to COM1 first).
    pub const CONFIG: u8 = 1;
    /// The guest panicked (message on COM1).
    pub const PANIC: u8 = 2;
    /// Unexpected CPU exception (vector, error code, RIP, … on COM1).
    pub const CPU_EXCEPTION: u8 = 3;
    /// The virtio-net device could not be initialized (reason on COM1).
    pub const DEVICE: u8 = 4;
}

/// Interrupt vectors the guest uses.
pub mod vectors {
    /// LAPIC timer (periodic, `hz=` guest argument, default 100 Hz).
    pub const TIMER: u8 = 0x20;
    /// virtio-net configuration change (MSI-X table entry 0). On each one the guest
    /// broadcasts a gratuitous ARP for its address.
    pub const VIRTIO_CONFIG: u8 = 0x21;
    /// virtio-net receive queue (MSI-X table entry 1).
    pub const VIRTIO_RX: u8 = 0x22;
    /// virtio-net transmit queue (MSI-X table entry 2; the guest suppresses TX interrupts
    /// unless it runs out of TX descriptors).
    pub const VIRTIO_TX: u8 = 0x23;
}

/// The format of the built-in guest's durable store on disk 0 (its `kvlog.rs`), for tools
/// and tests that read disk images, or tear them.
#[path = "../../guest/src/kvlog.rs"]
pub mod kvlog;

#[cfg(test)]
#[path = "../../guest/src/args.rs"]
#[allow(dead_code)]
mod guest_args;

#[cfg(test)]
#[path = "../../guest/src/proto.rs"]
#[allow(dead_code)]
mod guest_proto;

#[cfg(test)]
#[path = "../../guest/src/pagefmt.rs"]
#[allow(dead_code)]
mod guest_pagefmt;

#[cfg(test)]
#[path = "../../guest/src/ram.rs"]
#[allow(dead_code)]
mod guest_ram;

#[cfg(test)]
#[path = "../../guest/src/ring.rs"]
#[allow(dead_code)]
mod guest_ring;

#[cfg(test)]
#[path = "../../guest/src/resp.rs"]
#[allow(dead_code)]
mod guest_resp;

#[cfg(test)]
mod tests;
