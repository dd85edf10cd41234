//! Local APIC timer (xAPIC MMIO, user-mapped) and the legacy 8259 PIC.

use crate::arch::{outb, VEC_PIC_BASE, VEC_TIMER};

const LAPIC_BASE: usize = 0xFEE0_0000;
const REG_ID: usize = 0x20;
const REG_SVR: usize = 0xF0;
const REG_LVT_TIMER: usize = 0x320;
const REG_LVT_LINT0: usize = 0x350;
const REG_LVT_LINT1: usize = 0x360;
const REG_LVT_ERROR: usize = 0x370;
const REG_TIMER_INIT: usize = 0x380;
const REG_TIMER_DIV: usize = 0x3E0;

const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;

/// The LAPIC timer's input clock under KVM (1 GHz bus clock, TDCR = 0xB divides by 1).
pub const LAPIC_TIMER_HZ: u64 = 1_000_000_000;

/// The address of xAPIC register `reg`: registers are 16-byte aligned in the first 0x400
/// bytes of the LAPIC page, and any other offset is a bug here (the callers pass the
/// `REG_*` constants, so the check folds away).
fn reg_addr(reg: usize) -> usize {
    assert!(
        reg < 0x400 && reg & 0xF == 0,
        "bad LAPIC register offset {reg:#x}"
    );
    LAPIC_BASE + reg
}

fn read(reg: usize) -> u32 {
    // SAFETY: `reg_addr` checked the offset, so this is a 4-byte-aligned register of the
    // LAPIC page at 0xFEE0_0000. The boot contract maps that page user-accessible and
    // uncached, and it is not RAM: the access goes to KVM's in-kernel LAPIC and cannot
    // alias any Rust object. LAPIC register reads have no side effects.
    unsafe { (reg_addr(reg) as *const u32).read_volatile() }
}

fn write(reg: usize, value: u32) {
    // SAFETY: as in `read`, a 4-byte-aligned LAPIC register, not RAM. The registers written
    // here (SVR, LVTs, timer divide/initial count) change only which interrupts arrive,
    // and every vector has a handler in the guest header.
    unsafe { (reg_addr(reg) as *mut u32).write_volatile(value) }
}

/// This CPU's LAPIC ID (MSI-X messages are addressed to it).
pub fn id() -> u8 {
    (read(REG_ID) >> 24) as u8
}

/// Remap the legacy PIC away from the exception vectors and mask all its inputs; mask the
/// LAPIC's LINT0/LINT1 (ExtINT/NMI) and error LVTs. The guest uses only the LAPIC timer
/// and MSI-X.
pub fn quiet_legacy_interrupts() {
    // ICW1..ICW4, then OCW1 = mask everything.
    for (port, value) in [
        (0x20, 0x11),
        (0xA0, 0x11),
        (0x21, VEC_PIC_BASE),
        (0xA1, VEC_PIC_BASE + 8),
        (0x21, 4),
        (0xA1, 2),
        (0x21, 1),
        (0xA1, 1),
        (0x21, 0xFF),
        (0xA1, 0xFF),
    ] {
        outb(port, value);
    }
    write(REG_LVT_LINT0, LVT_MASKED | 0x700);
    write(REG_LVT_LINT1, LVT_MASKED | 0x400);
    write(REG_LVT_ERROR, LVT_MASKED);
}

/// Start the LAPIC timer in periodic mode at `hz`; returns the initial count used.
pub fn start_timer(hz: u32) -> u32 {
    if read(REG_SVR) & 0x100 == 0 {
        // The VMM should have software-enabled the LAPIC; do it if it did not.
        write(REG_SVR, 0x1FF);
    }
    let count = (LAPIC_TIMER_HZ / u64::from(hz.max(1))).clamp(1, u64::from(u32::MAX)) as u32;
    write(REG_TIMER_DIV, 0xB);
    write(REG_LVT_TIMER, LVT_PERIODIC | u32::from(VEC_TIMER));
    write(REG_TIMER_INIT, count);
    count
}
