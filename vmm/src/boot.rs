//! Loads the built-in guest and prepares the CPU state it starts in.
//!
//! The guest runs at CPL 3 from its first instruction (PVM emulates CPL 0, so the guest
//! keeps CPL-0 work to interrupt stubs). The VMM therefore does what firmware and an early
//! kernel would: builds the GDT, IDT, TSS and page tables and enters long mode directly.
//! The layout is the boot contract in ARCHITECTURE.md.

use std::net::Ipv4Addr;

use kvm_bindings::{kvm_dtable, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::memory::{GuestMem, RamMap};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const PT_LOAD: u32 = 1;

pub const HEADER_MAGIC: &[u8; 8] = b"TWINGST\0";
pub const HEADER_VERSION: u32 = 1;
/// magic, version, header_size, entry, stack_top, 256 vectors.
const HEADER_SIZE: usize = 8 + 4 + 4 + 8 + 8 + 256 * 8;

pub const BOOT_INFO_MAGIC: &[u8; 8] = b"TWINBOOT";
/// Version 2 added the RAM ranges (RAM above the MMIO hole).
pub const BOOT_INFO_VERSION: u32 = 2;
pub const MAX_GUEST_ARGS: usize = 1024;
/// Room for this many RAM ranges in `BootInfo` (the VMM uses at most two).
pub const MAX_RAM_RANGES: usize = 4;
/// Offset of `ram_count` in `BootInfo`, after the arguments.
const RAM_RANGES_OFFSET: usize = 48 + MAX_GUEST_ARGS;
const BOOT_INFO_SIZE: usize = RAM_RANGES_OFFSET + 8 + MAX_RAM_RANGES * 16;

const SEL_KERNEL_CODE: u16 = 0x08;
const SEL_USER_DATA: u16 = 0x18 | 3;
const SEL_USER_CODE: u16 = 0x20 | 3;
const SEL_TSS: u16 = 0x28;

/// Errors loading the built-in guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("guest image is not a 64-bit little-endian x86-64 executable ELF")]
    NotElf,
    #[error("guest image is truncated: {0}")]
    Truncated(&'static str),
    #[error("guest image segment at {addr:#x}+{len:#x} is outside guest RAM below the MMIO hole [{IMAGE_BASE:#x}, {mem:#x})")]
    SegmentOutOfRange { addr: u64, len: u64, mem: u64 },
    #[error("guest image has no `.twin_header` with magic TWINGST at {IMAGE_BASE:#x}")]
    NoHeader,
    #[error("guest image header version {0} is not supported (this VMM speaks {HEADER_VERSION})")]
    HeaderVersion(u32),
    #[error("guest image header field {field} = {value:#x} is invalid")]
    BadHeaderField { field: &'static str, value: u64 },
    #[error("--guest-args is {0} bytes, more than the {MAX_GUEST_ARGS} the guest accepts")]
    ArgsTooLong(usize),
    #[error("guest RAM of {mem_size:#x} bytes needs an identity map beyond the {IDENTITY_MAP_MAX:#x} bytes the page directories below the image can hold")]
    IdentityMapTooLarge { mem_size: u64 },
    #[error("writing boot structures into guest memory failed")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// What the guest is told at boot (the `BootInfo` page).
#[derive(Clone, Debug)]
pub struct BootParams {
    pub mem_size: u64,
    pub tsc_khz: u64,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub guest_args: String,
}

/// Where the loaded guest starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryPoint {
    pub rip: u64,
    pub rsp: u64,
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, BootError> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes(s.try_into().unwrap()))
        .ok_or(BootError::Truncated("ELF header"))
}
fn u32_at(b: &[u8], off: usize) -> Result<u32, BootError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
        .ok_or(BootError::Truncated("ELF header"))
}
fn u64_at(b: &[u8], off: usize) -> Result<u64, BootError> {
    b.get(off..off + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
        .ok_or(BootError::Truncated("ELF header"))
}

/// Copies the LOAD segments of `elf` into guest memory, checks the guest header and writes
/// GDT, IDT, TSS, page tables and `BootInfo`. Returns where the guest starts.
pub fn load_builtin_guest(
    mem: &GuestMem,
    elf: &[u8],
    params: &BootParams,
) -> Result<EntryPoint, BootError> {
    if elf.len() < 64 || &elf[..4] != ELF_MAGIC || elf[4] != 2 || elf[5] != 1 {
        return Err(BootError::NotElf);
    }
    if u16_at(elf, 16)? != ET_EXEC || u16_at(elf, 18)? != EM_X86_64 {
        return Err(BootError::NotElf);
    }
    let e_entry = u64_at(elf, 24)?;
    let e_phoff = u64_at(elf, 32)? as usize;
    let e_phentsize = u16_at(elf, 54)? as usize;
    let e_phnum = u16_at(elf, 56)? as usize;
    if e_phentsize < 56 {
        return Err(BootError::NotElf);
    }
    // The image loads into RAM below the MMIO hole.
    let mem_size = params.mem_size.min(MMIO_HOLE_START);
    let mut image_end = IMAGE_BASE;
    for i in 0..e_phnum {
        let ph = e_phoff
            .checked_add(i * e_phentsize)
            .ok_or(BootError::Truncated("program headers"))?;
        if u32_at(elf, ph)? != PT_LOAD {
            continue;
        }
        let offset = u64_at(elf, ph + 8)? as usize;
        let paddr = u64_at(elf, ph + 24)?;
        let filesz = u64_at(elf, ph + 32)? as usize;
        let memsz = u64_at(elf, ph + 40)?;
        let end = paddr.checked_add(memsz);
        if paddr < IMAGE_BASE || end.is_none_or(|e| e > mem_size) || (filesz as u64) > memsz {
            return Err(BootError::SegmentOutOfRange {
                addr: paddr,
                len: memsz,
                mem: mem_size,
            });
        }
        let data = offset
            .checked_add(filesz)
            .and_then(|e| elf.get(offset..e))
            .ok_or(BootError::Truncated("segment data"))?;
        mem.write_slice(data, GuestAddress(paddr))
            .map_err(BootError::GuestMemory)?;
        // Fresh guest RAM is zero already, but a reused region may not be.
        let bss = vec![0u8; (memsz - filesz as u64) as usize];
        mem.write_slice(&bss, GuestAddress(paddr + filesz as u64))
            .map_err(BootError::GuestMemory)?;
        image_end = image_end.max(paddr + memsz);
    }

    let mut header = [0u8; HEADER_SIZE];
    mem.read_slice(&mut header, GuestAddress(IMAGE_BASE))
        .map_err(BootError::GuestMemory)?;
    if &header[..8] != HEADER_MAGIC {
        return Err(BootError::NoHeader);
    }
    let version = u32_at(&header, 8)?;
    if version != HEADER_VERSION {
        return Err(BootError::HeaderVersion(version));
    }
    let header_size = u32_at(&header, 12)? as u64;
    if header_size < HEADER_SIZE as u64 {
        return Err(BootError::BadHeaderField {
            field: "header_size",
            value: header_size,
        });
    }
    let entry = u64_at(&header, 16)?;
    let stack_top = u64_at(&header, 24)?;
    let in_image = |a: u64| (IMAGE_BASE..image_end).contains(&a);
    if !in_image(entry) || entry != e_entry {
        return Err(BootError::BadHeaderField {
            field: "entry",
            value: entry,
        });
    }
    if stack_top % 16 != 0 || !(IMAGE_BASE + 1..=image_end).contains(&stack_top) {
        return Err(BootError::BadHeaderField {
            field: "stack_top",
            value: stack_top,
        });
    }
    let mut vectors = [0u64; 256];
    for (v, slot) in vectors.iter_mut().enumerate() {
        let h = u64_at(&header, 32 + v * 8)?;
        if h != 0 && !in_image(h) {
            return Err(BootError::BadHeaderField {
                field: "vectors[]",
                value: h,
            });
        }
        *slot = h;
    }

    write_gdt(mem)?;
    write_idt(mem, &vectors)?;
    write_tss(mem)?;
    write_page_tables(mem, &RamMap::new(params.mem_size))?;
    write_boot_info(mem, params)?;
    Ok(EntryPoint {
        rip: entry,
        rsp: stack_top,
    })
}

fn write_gdt(mem: &GuestMem) -> Result<(), BootError> {
    let tss_limit = TSS_SIZE - 1;
    let tss_low = (tss_limit & 0xffff)
        | ((TSS_ADDR & 0xff_ffff) << 16)
        | (0x89u64 << 40) // present, 64-bit available TSS
        | (((tss_limit >> 16) & 0xf) << 48)
        | (((TSS_ADDR >> 24) & 0xff) << 56);
    let gdt: [u64; 7] = [
        0,
        0x0020_9A00_0000_0000, // 0x08 kernel code, 64-bit
        0x0000_9200_0000_0000, // 0x10 kernel data
        0x0000_F200_0000_0000, // 0x18 user data, DPL 3
        0x0020_FA00_0000_0000, // 0x20 user code, 64-bit, DPL 3
        tss_low,               // 0x28 TSS (16 bytes)
        TSS_ADDR >> 32,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(BootError::GuestMemory)?;
    }
    Ok(())
}

fn write_idt(mem: &GuestMem, vectors: &[u64; 256]) -> Result<(), BootError> {
    for (v, &handler) in vectors.iter().enumerate() {
        let (low, high) = if handler == 0 {
            (0, 0)
        } else {
            let low = (handler & 0xffff)
                | ((SEL_KERNEL_CODE as u64) << 16)
                | (0x8Eu64 << 40) // present, DPL 0, 64-bit interrupt gate
                | (((handler >> 16) & 0xffff) << 48);
            (low, handler >> 32)
        };
        let at = IDT_ADDR + v as u64 * 16;
        mem.write_obj(low, GuestAddress(at))
            .map_err(BootError::GuestMemory)?;
        mem.write_obj(high, GuestAddress(at + 8))
            .map_err(BootError::GuestMemory)?;
    }
    Ok(())
}

fn write_tss(mem: &GuestMem) -> Result<(), BootError> {
    let mut tss = vec![0u8; TSS_SIZE as usize];
    tss[4..12].copy_from_slice(&KERNEL_STACK_TOP.to_le_bytes()); // RSP0
    tss[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes()); // I/O map base
                                                             // The bitmap (zero: every port allowed) stands in for IOPL, which PVM ignores.
    *tss.last_mut().unwrap() = 0xff;
    mem.write_slice(&tss, GuestAddress(TSS_ADDR))
        .map_err(BootError::GuestMemory)
}

/// The identity map: 2 MiB pages, present + writable + user. `[0, 4 GiB)` is mapped whole,
/// RAM and MMIO hole (uncached) alike, as in every version of the contract; above 4 GiB
/// exactly the RAM (a 2 MiB multiple) is, one page directory per GiB it touches.
fn write_page_tables(mem: &GuestMem, ram: &RamMap) -> Result<(), BootError> {
    const PRESENT_RW_USER: u64 = 0x7;
    const HUGE: u64 = 0x80;
    const UNCACHED: u64 = 0x18; // PWT | PCD
    const GIB: u64 = 1 << 30;
    const PAGE_2M: u64 = 2 << 20;
    let ram_end = ram.ranges().last().map_or(0, |r| r.gpa_end());
    let map_end = ram_end.max(HIGH_RAM_START);
    if map_end > IDENTITY_MAP_MAX {
        return Err(BootError::IdentityMapTooLarge {
            mem_size: ram.page_count() as u64 * crate::memory::PAGE_SIZE as u64,
        });
    }
    let pds = map_end.div_ceil(GIB);
    mem.write_obj(PDPT_ADDR | PRESENT_RW_USER, GuestAddress(PML4_ADDR))
        .map_err(BootError::GuestMemory)?;
    let mut pd = vec![0u8; (pds * 4096) as usize];
    for gib in 0..pds {
        let pd_addr = PD_ADDR + gib * 4096;
        mem.write_obj(pd_addr | PRESENT_RW_USER, GuestAddress(PDPT_ADDR + gib * 8))
            .map_err(BootError::GuestMemory)?;
        for i in 0..512u64 {
            let addr = gib * GIB + i * PAGE_2M;
            let mut e = addr | PRESENT_RW_USER | HUGE;
            if addr >= HIGH_RAM_START && addr >= ram_end {
                continue; // neither RAM nor the hole: not present
            }
            if (MMIO_HOLE_START..HIGH_RAM_START).contains(&addr) {
                e |= UNCACHED;
            }
            let off = ((gib * 512 + i) * 8) as usize;
            pd[off..off + 8].copy_from_slice(&e.to_le_bytes());
        }
    }
    mem.write_slice(&pd, GuestAddress(PD_ADDR))
        .map_err(BootError::GuestMemory)
}

fn write_boot_info(mem: &GuestMem, p: &BootParams) -> Result<(), BootError> {
    let args = p.guest_args.as_bytes();
    if args.len() > MAX_GUEST_ARGS {
        return Err(BootError::ArgsTooLong(args.len()));
    }
    let mut b = vec![0u8; BOOT_INFO_SIZE];
    b[0..8].copy_from_slice(BOOT_INFO_MAGIC);
    b[8..12].copy_from_slice(&BOOT_INFO_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(BOOT_INFO_SIZE as u32).to_le_bytes());
    b[16..24].copy_from_slice(&p.mem_size.to_le_bytes());
    b[24..32].copy_from_slice(&p.tsc_khz.to_le_bytes());
    b[32..36].copy_from_slice(&p.ip.octets());
    b[36] = p.prefix_len;
    b[40..44].copy_from_slice(&p.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED).octets());
    b[44..48].copy_from_slice(&(args.len() as u32).to_le_bytes());
    b[48..48 + args.len()].copy_from_slice(args);
    // Version 2: the RAM ranges, in address order (their sizes add up to `mem_size`).
    let ram = RamMap::new(p.mem_size);
    let ranges = ram.ranges();
    debug_assert!(ranges.len() <= MAX_RAM_RANGES);
    b[RAM_RANGES_OFFSET..RAM_RANGES_OFFSET + 4]
        .copy_from_slice(&(ranges.len() as u32).to_le_bytes());
    for (i, r) in ranges.iter().take(MAX_RAM_RANGES).enumerate() {
        let at = RAM_RANGES_OFFSET + 8 + i * 16;
        b[at..at + 8].copy_from_slice(&r.gpa.to_le_bytes());
        b[at + 8..at + 16].copy_from_slice(&r.size().to_le_bytes());
    }
    mem.write_slice(&b, GuestAddress(BOOT_INFO_ADDR))
        .map_err(BootError::GuestMemory)
}

/// RFLAGS of a parked vCPU (every vCPU but the first; see `builder::boot_vcpu`): only the
/// always-one bit, interrupts disabled.
pub const PARKED_RFLAGS: u64 = 0x2;

/// Registers the guest starts with.
pub fn initial_regs(entry: EntryPoint) -> kvm_regs {
    kvm_regs {
        rip: entry.rip,
        rsp: entry.rsp,
        rdi: BOOT_INFO_ADDR,
        rflags: 0x202, // IF
        ..Default::default()
    }
}

/// xAPIC registers the boot contract sets, by offset in the register page (the layout of
/// `kvm_lapic_state.regs`; Intel SDM vol. 3A, table 11-1).
pub mod apic {
    /// Spurious-interrupt vector register.
    pub const SPIV: usize = 0xF0;
    /// Local vector table entry of LINT0 (the 8259 PIC's INTR pin).
    pub const LVT_LINT0: usize = 0x350;
    /// Local vector table entry of LINT1 (NMI).
    pub const LVT_LINT1: usize = 0x360;

    /// SPIV: the APIC is software-enabled.
    pub const SPIV_APIC_ENABLED: u32 = 1 << 8;
    /// SPIV: the spurious-interrupt vector.
    pub const SPURIOUS_VECTOR: u32 = 0xFF;
    /// LVT delivery mode ExtINT: the vector comes from the PIC.
    pub const DM_EXTINT: u32 = 0b111 << 8;
    /// LVT delivery mode NMI.
    pub const DM_NMI: u32 = 0b100 << 8;
    /// LVT: the entry is masked.
    pub const LVT_MASKED: u32 = 1 << 16;
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, reg: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[reg + i] = *b as i8;
    }
}

/// The LAPIC the guest starts with: software-enabled (the guest programs its own timer),
/// the PIC's ExtINT on LINT0 masked (the IOAPIC delivers legacy interrupts), NMI on LINT1.
pub fn initial_lapic(lapic: &mut kvm_lapic_state) {
    set_lapic_reg(
        lapic,
        apic::SPIV,
        apic::SPIV_APIC_ENABLED | apic::SPURIOUS_VECTOR,
    );
    set_lapic_reg(lapic, apic::LVT_LINT0, apic::LVT_MASKED | apic::DM_EXTINT);
    set_lapic_reg(lapic, apic::LVT_LINT1, apic::DM_NMI);
}

/// Long mode at CPL 3 with the contract's GDT, IDT, TSS and page tables, SSE enabled.
pub fn initial_sregs(mut s: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: SEL_USER_CODE,
        type_: 0xb,
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: SEL_USER_DATA,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: TSS_ADDR,
        limit: (TSS_SIZE - 1) as u32,
        selector: SEL_TSS,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    s.gdt = kvm_dtable {
        base: GDT_ADDR,
        limit: 7 * 8 - 1,
        ..Default::default()
    };
    s.idt = kvm_dtable {
        base: IDT_ADDR,
        limit: 256 * 16 - 1,
        ..Default::default()
    };
    // PE | MP | ET | NE | WP | PG: MP + OSFXSR + OSXMMEXCPT let compiled code use SSE.
    s.cr0 = 0x8005_0033;
    s.cr4 = 0x20 | 0x200 | 0x400; // PAE | OSFXSR | OSXMMEXCPT
    s.cr3 = PML4_ADDR;
    s.efer = 0x500; // LME | LMA
    s
}

/// A network identity for a restored guest: what a clone of a snapshot becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetIdentity {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
}

const IDENTITY_MAGIC: &[u8; 8] = b"TWINNETI";

/// Writes `id` as the guest's network identity record at [`IDENTITY_ADDR`] (magic
/// `TWINNETI`, u32 sequence number, pad, MAC, prefix length, pad, IPv4 address, gateway:
/// 32 bytes, see guest/src/identity.rs) with a sequence number one past the record there
/// now, and returns that number. Only while no vCPU runs: the guest copies the record out
/// when the NIC's configuration interrupt fires and takes an identity whose sequence
/// number it has not seen.
pub fn write_identity(mem: &GuestMem, id: &NetIdentity) -> Result<u32, BootError> {
    let mut old = [0u8; 12];
    mem.read_slice(&mut old, GuestAddress(IDENTITY_ADDR))
        .map_err(BootError::GuestMemory)?;
    let prev = if &old[..8] == IDENTITY_MAGIC {
        u32::from_le_bytes(old[8..12].try_into().expect("4 bytes"))
    } else {
        0
    };
    // 0 never names an identity.
    let seq = prev.wrapping_add(1).max(1);
    let mut b = [0u8; 32];
    b[0..8].copy_from_slice(IDENTITY_MAGIC);
    b[8..12].copy_from_slice(&seq.to_le_bytes());
    b[16..22].copy_from_slice(&id.mac);
    b[22] = id.prefix_len;
    b[24..28].copy_from_slice(&id.ip.octets());
    b[28..32].copy_from_slice(&id.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED).octets());
    mem.write_slice(&b, GuestAddress(IDENTITY_ADDR))
        .map_err(BootError::GuestMemory)?;
    Ok(seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn initial_lapic_is_the_contract() {
        let mut l = kvm_lapic_state::default();
        initial_lapic(&mut l);
        let reg = |off: usize| u32::from_le_bytes(std::array::from_fn(|i| l.regs[off + i] as u8));
        // The values the boot contract names (ARCHITECTURE.md): SVR 0x1FF, LINT0 ExtINT
        // masked, LINT1 NMI.
        assert_eq!(reg(0xF0), 0x1FF);
        assert_eq!(reg(0x350), 0x1_0700);
        assert_eq!(reg(0x360), 0x400);
    }

    fn params() -> BootParams {
        BootParams {
            mem_size: 16 << 20,
            tsc_khz: 2_000_000,
            ip: Ipv4Addr::new(10, 0, 0, 2),
            prefix_len: 24,
            gateway: None,
            guest_args: "dirty=1M/s".into(),
        }
    }

    /// A minimal ELF with one LOAD segment at IMAGE_BASE holding a guest header.
    fn tiny_elf(entry_off: u64, stack_off: u64, magic: &[u8; 8]) -> Vec<u8> {
        let seg_off = 0x1000usize;
        let mut hdr = vec![0u8; HEADER_SIZE];
        hdr[..8].copy_from_slice(magic);
        hdr[8..12].copy_from_slice(&1u32.to_le_bytes());
        hdr[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        hdr[16..24].copy_from_slice(&(IMAGE_BASE + entry_off).to_le_bytes());
        hdr[24..32].copy_from_slice(&(IMAGE_BASE + stack_off).to_le_bytes());
        hdr[32 + 14 * 8..32 + 15 * 8].copy_from_slice(&(IMAGE_BASE + 0x900).to_le_bytes());
        let mut elf = vec![0u8; seg_off];
        elf[..4].copy_from_slice(ELF_MAGIC);
        elf[4] = 2;
        elf[5] = 1;
        elf[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        elf[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        elf[24..32].copy_from_slice(&(IMAGE_BASE + entry_off).to_le_bytes());
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        elf[ph + 8..ph + 16].copy_from_slice(&(seg_off as u64).to_le_bytes());
        elf[ph + 24..ph + 32].copy_from_slice(&IMAGE_BASE.to_le_bytes());
        elf[ph + 32..ph + 40].copy_from_slice(&(hdr.len() as u64).to_le_bytes());
        elf[ph + 40..ph + 48].copy_from_slice(&0x4000u64.to_le_bytes());
        elf.extend_from_slice(&hdr);
        elf
    }

    #[test]
    fn loads_header_and_builds_tables() {
        let m = crate::memory::Memory::new(16 << 20).unwrap();
        let elf = tiny_elf(0x800, 0x4000, HEADER_MAGIC);
        let e = load_builtin_guest(m.guest_memory(), &elf, &params()).unwrap();
        assert_eq!(
            e,
            EntryPoint {
                rip: IMAGE_BASE + 0x800,
                rsp: IMAGE_BASE + 0x4000
            }
        );
        let g = m.guest_memory();
        // Vector 14 gate points at the handler, vector 13 is not present.
        let lo: u64 = g.read_obj(GuestAddress(IDT_ADDR + 14 * 16)).unwrap();
        assert_eq!(lo & 0xffff, 0x0900);
        assert_eq!((lo >> 16) & 0xffff, 0x08);
        assert_eq!((lo >> 40) & 0xff, 0x8E);
        assert_eq!(
            g.read_obj::<u64>(GuestAddress(IDT_ADDR + 13 * 16)).unwrap(),
            0
        );
        // 3 GiB + 2 MiB is mapped uncached, RAM is not.
        let pde: u64 = g
            .read_obj(GuestAddress(PD_ADDR + (3 * 512 + 1) * 8))
            .unwrap();
        assert_eq!(pde, 0xC020_0000 | 0x87 | 0x18);
        let pde0: u64 = g.read_obj(GuestAddress(PD_ADDR)).unwrap();
        assert_eq!(pde0, 0x87);
        let mut magic = [0u8; 8];
        g.read_slice(&mut magic, GuestAddress(BOOT_INFO_ADDR))
            .unwrap();
        assert_eq!(&magic, BOOT_INFO_MAGIC);
        assert_eq!(
            g.read_obj::<u8>(GuestAddress(BOOT_INFO_ADDR + 48)).unwrap(),
            b'd'
        );
    }

    #[test]
    fn ram_above_the_hole_is_identity_mapped_and_announced() {
        const GIB: u64 = 1 << 30;
        let read = |g: &GuestMem, a: u64| g.read_obj::<u64>(GuestAddress(a)).unwrap();
        let pde = |g: &GuestMem, gpa: u64| read(g, PD_ADDR + (gpa >> 21) * 8);
        for (mem_size, ram_end) in [
            (16 * GIB, 17 * GIB),
            (3 * GIB + (2 << 20), 4 * GIB + (2 << 20)),
        ] {
            // Sparse: only the tables and the image are written.
            let m = crate::memory::Memory::new(mem_size).unwrap();
            let g = m.guest_memory();
            let p = BootParams {
                mem_size,
                ..params()
            };
            load_builtin_guest(g, &tiny_elf(0x800, 0x4000, HEADER_MAGIC), &p).unwrap();
            let pds = ram_end.div_ceil(GIB);
            for gib in 0..pds {
                assert_eq!(
                    read(g, PDPT_ADDR + gib * 8),
                    (PD_ADDR + gib * 4096) | 0x7,
                    "PDPT entry {gib}"
                );
            }
            assert_eq!(read(g, PDPT_ADDR + pds * 8), 0, "nothing past RAM");
            // The hole as before, RAM above it cached, nothing past the end of RAM.
            assert_eq!(pde(g, 3 * GIB), (3 * GIB) | 0x87 | 0x18);
            assert_eq!(pde(g, 4 * GIB), (4 * GIB) | 0x87);
            let last = ram_end - (2 << 20);
            assert_eq!(pde(g, last), last | 0x87);
            if ram_end % GIB != 0 {
                assert_eq!(pde(g, ram_end), 0);
            }
            // BootInfo version 2 names both ranges.
            assert_eq!(read(g, BOOT_INFO_ADDR + 8) as u32, 2);
            let at = BOOT_INFO_ADDR + RAM_RANGES_OFFSET as u64;
            assert_eq!(read(g, at) as u32, 2, "two ranges");
            assert_eq!((read(g, at + 8), read(g, at + 16)), (0, 3 * GIB));
            assert_eq!(
                (read(g, at + 24), read(g, at + 32)),
                (4 * GIB, mem_size - 3 * GIB)
            );
            assert_eq!(read(g, at + 40), 0, "no third range");
        }
        // A small guest: one range, the first 4 GiB mapped as always.
        let m = crate::memory::Memory::new(16 << 20).unwrap();
        let g = m.guest_memory();
        load_builtin_guest(g, &tiny_elf(0x800, 0x4000, HEADER_MAGIC), &params()).unwrap();
        let at = BOOT_INFO_ADDR + RAM_RANGES_OFFSET as u64;
        assert_eq!(read(g, at) as u32, 1);
        assert_eq!((read(g, at + 8), read(g, at + 16)), (0, 16 << 20));
        assert_eq!(read(g, PDPT_ADDR + 4 * 8), 0);
        assert_eq!(pde(g, GIB), GIB | 0x87, "[mem, 3 GiB) mapped as before");
    }

    #[test]
    fn rejects_bad_images() {
        let m = crate::memory::Memory::new(16 << 20).unwrap();
        let g = m.guest_memory();
        assert!(matches!(
            load_builtin_guest(g, b"nope", &params()),
            Err(BootError::NotElf)
        ));
        let elf = tiny_elf(0x800, 0x4000, b"XXXXXXXX");
        assert!(matches!(
            load_builtin_guest(g, &elf, &params()),
            Err(BootError::NoHeader)
        ));
        let elf = tiny_elf(0x800, 0x4008, HEADER_MAGIC);
        assert!(matches!(
            load_builtin_guest(g, &elf, &params()),
            Err(BootError::BadHeaderField {
                field: "stack_top",
                ..
            })
        ));
        let mut p = params();
        p.mem_size = 1 << 20;
        let elf = tiny_elf(0x800, 0x4000, HEADER_MAGIC);
        assert!(matches!(
            load_builtin_guest(g, &elf, &p),
            Err(BootError::SegmentOutOfRange { .. })
        ));
        for cut in [10, 63, 70, 0x1010] {
            assert!(load_builtin_guest(g, &elf[..cut], &params()).is_err());
        }
    }
}
