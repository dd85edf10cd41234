//! virtio-net over virtio-pci (modern, virtio 1.x) with MSI-X and split virtqueues, and
//! its `smoltcp` device.
//!
//! Memory is identity-mapped, so ring and buffer addresses given to the device are the
//! pointers' values. Interrupts are NAPI-style: while the main loop is busy it polls the
//! rings with device interrupts suppressed (`VIRTQ_AVAIL_F_NO_INTERRUPT`); before halting
//! it re-enables them and checks the rings once more ([`VirtioNet::prepare_idle`]).

use crate::arch::{mb, VEC_CONFIG, VEC_RX, VEC_TX};
use crate::pci::PciFunction;
use alloc::alloc::{alloc_zeroed, Layout};
use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// virtio PCI vendor ID.
pub const VENDOR: u16 = 0x1AF4;
/// Modern virtio-net PCI device ID.
pub const DEVICE_NET: u16 = 0x1041;

pub(crate) const STATUS_ACKNOWLEDGE: u8 = 1;
pub(crate) const STATUS_DRIVER: u8 = 2;
pub(crate) const STATUS_DRIVER_OK: u8 = 4;
pub(crate) const STATUS_FEATURES_OK: u8 = 8;
pub(crate) const STATUS_NEEDS_RESET: u8 = 0x40;
pub(crate) const STATUS_FAILED: u8 = 0x80;

const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
pub(crate) const F_VERSION_1: u64 = 1 << 32;

const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

// Common configuration structure offsets.
pub(crate) const C_DEVICE_FEATURE_SELECT: usize = 0x00;
pub(crate) const C_DEVICE_FEATURE: usize = 0x04;
pub(crate) const C_DRIVER_FEATURE_SELECT: usize = 0x08;
pub(crate) const C_DRIVER_FEATURE: usize = 0x0C;
pub(crate) const C_MSIX_CONFIG: usize = 0x10;
pub(crate) const C_NUM_QUEUES: usize = 0x12;
pub(crate) const C_DEVICE_STATUS: usize = 0x14;
pub(crate) const C_QUEUE_SELECT: usize = 0x16;
pub(crate) const C_QUEUE_SIZE: usize = 0x18;
pub(crate) const C_QUEUE_MSIX_VECTOR: usize = 0x1A;
pub(crate) const C_QUEUE_ENABLE: usize = 0x1C;
pub(crate) const C_QUEUE_NOTIFY_OFF: usize = 0x1E;
pub(crate) const C_QUEUE_DESC: usize = 0x20;
pub(crate) const C_QUEUE_DRIVER: usize = 0x28;
pub(crate) const C_QUEUE_DEVICE: usize = 0x30;

pub(crate) const NO_VECTOR: u16 = 0xFFFF;

pub(crate) const VIRTQ_DESC_F_NEXT: u16 = 1;
pub(crate) const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Size of `virtio_net_hdr_v1` (VERSION_1 is always negotiated).
pub const NET_HDR_LEN: usize = 12;
/// Bytes per packet buffer: header + a full Ethernet frame (1514), rounded up.
const BUF_LEN: usize = 2048;
/// Largest Ethernet frame (without FCS) we send or accept.
pub const MAX_FRAME: usize = 1514;
/// Queue size we ask for (the device may offer less).
const MAX_QUEUE_SIZE: u16 = 256;

/// Why the device could not be brought up.
pub type InitError = &'static str;

/// End of the PCI MMIO window: the IOAPIC follows at 0xFEC0_0000 (boot contract). The
/// window starts at [`crate::MMIO_START`], where RAM ends.
const PCI_MMIO_END: usize = 0xFEC0_0000;

/// The widths of device register accesses. Every bit pattern is a valid value of each, so
/// a volatile read of device memory yields a valid one. Private: no other type can be used.
trait RegWidth: Copy {}
impl RegWidth for u8 {}
impl RegWidth for u16 {}
impl RegWidth for u32 {}

/// `addr` as a pointer to a device register of type `T`, once checked to be one: inside
/// the PCI MMIO window, where the VMM assigns BARs, and aligned for `T`. Register addresses
/// are built from what the device reports (capability offsets, the MSI-X table offset,
/// notify multipliers), so a bad one is a device bug, and it stops the guest with a panic
/// instead of becoming an access to guest RAM.
fn reg<T: RegWidth>(addr: usize) -> *mut T {
    assert!(
        addr >= crate::MMIO_START as usize
            && addr <= PCI_MMIO_END - core::mem::size_of::<T>()
            && addr & (core::mem::align_of::<T>() - 1) == 0,
        "virtio register address {addr:#x} is outside the PCI MMIO window or misaligned"
    );
    addr as *mut T
}

fn mmio_read<T: RegWidth>(addr: usize) -> T {
    let p = reg::<T>(addr);
    // SAFETY: `reg` checked that `p` is aligned for T and inside the PCI MMIO window
    // [0xC000_0000, 0xFEC0_0000), which the boot contract keeps free of RAM (the guest's
    // RAM ends at or below 0xC000_0000) and maps identity, user-accessible and uncached.
    // So the read goes to the device's BAR (or, unbacked, exits to the VMM, which
    // ignores it) and cannot observe or disturb any Rust object; T accepts any value.
    unsafe { p.read_volatile() }
}

fn mmio_write<T: RegWidth>(addr: usize, v: T) {
    let p = reg::<T>(addr);
    // SAFETY: as in `mmio_read`, `p` is an aligned address in the PCI MMIO window, not
    // RAM, so the store itself cannot touch any Rust object. Its effect on the device can
    // make the device access guest memory (queue addresses, DRIVER_OK, notifications),
    // but only the memory given to it through the virtqueues: see `Virtq`.
    unsafe { p.write_volatile(v) }
}

pub(crate) fn mmio_read8(addr: usize) -> u8 {
    mmio_read(addr)
}
pub(crate) fn mmio_write8(addr: usize, v: u8) {
    mmio_write(addr, v);
}
pub(crate) fn mmio_read16(addr: usize) -> u16 {
    mmio_read(addr)
}
pub(crate) fn mmio_write16(addr: usize, v: u16) {
    mmio_write(addr, v);
}
pub(crate) fn mmio_read32(addr: usize) -> u32 {
    mmio_read(addr)
}
pub(crate) fn mmio_write32(addr: usize, v: u32) {
    mmio_write(addr, v);
}
/// 64-bit register written as two 32-bit halves, low first (as Linux does).
pub(crate) fn mmio_write64(addr: usize, v: u64) {
    mmio_write32(addr, v as u32);
    mmio_write32(addr + 4, (v >> 32) as u32);
}

/// Allocate zeroed, page-aligned memory that lives for the rest of the guest's life (it is
/// never freed: the device may access it until the VM stops).
pub(crate) fn alloc_pages(bytes: usize) -> Result<usize, InitError> {
    let layout = Layout::from_size_align(bytes.max(1), 4096).map_err(|_| "bad layout")?;
    // SAFETY: `alloc_zeroed` requires a layout of non-zero size: `bytes.max(1)` is at
    // least 1, and `from_size_align` checked the rest. A null result is handled below.
    let p = unsafe { alloc_zeroed(layout) };
    if p.is_null() {
        return Err("out of memory for virtqueues");
    }
    Ok(p as usize)
}

/// A split virtqueue as the driver sees it (virtio 1.2, 2.7 "Split Virtqueues").
///
/// The descriptor table (16 bytes per descriptor), the avail ring (`flags`, `idx`,
/// `ring[size]` of u16, `used_event`: 6 + 2 × size bytes) and the used ring (`flags`,
/// `idx`, `ring[size]` of (u32 id, u32 len), `avail_event`: 6 + 8 × size bytes) are
/// page-aligned allocations from [`alloc_pages`], never freed, that the device reads and
/// writes by DMA while the VM runs. The driver touches them only with volatile accesses
/// through raw pointers, never through references, so the device's writes cannot change
/// memory under a Rust borrow. The device accesses packet buffers only through
/// descriptors whose ids are posted in the avail ring, and returns them in the used ring.
pub(crate) struct Virtq {
    pub(crate) size: u16,
    pub(crate) desc: usize,
    pub(crate) avail: usize,
    pub(crate) used: usize,
    notify: usize,
    queue_index: u16,
    /// Next avail index to publish.
    avail_idx: u16,
    /// Used index we have consumed up to.
    last_used: u16,
}

impl Virtq {
    pub(crate) fn alloc(size: u16, notify: usize, queue_index: u16) -> Result<Virtq, InitError> {
        let n = usize::from(size);
        let desc = alloc_pages(16 * n)?;
        let avail = alloc_pages(6 + 2 * n)?;
        let used = alloc_pages(6 + 8 * n)?;
        Ok(Virtq {
            size,
            desc,
            avail,
            used,
            notify,
            queue_index,
            avail_idx: 0,
            last_used: 0,
        })
    }

    /// Point descriptor `id` at a buffer (length `len`, flags `flags`).
    ///
    /// # Safety
    /// `[addr, addr + BUF_LEN)` must be a buffer that belongs to this queue for the rest of
    /// the guest's life, and that Rust code does not reference while descriptor `id` is
    /// posted: the device then reads up to `len` bytes of it, or writes them with
    /// [`VIRTQ_DESC_F_WRITE`].
    unsafe fn set_desc(&mut self, id: u16, addr: u64, len: u32, flags: u16) {
        assert!(id < self.size && len as usize <= BUF_LEN);
        let d = self.desc + 16 * usize::from(id);
        // SAFETY: id < size (asserted), so [d, d + 16) is descriptor `id` inside the
        // 16 × size-byte table; the table is page-aligned, so d is 16-aligned and each
        // field (u64 addr, u32 len, u16 flags, u16 next) aligned for its type. Only volatile
        // raw accesses reach the table (see `Virtq`), and `&mut self` makes this the only
        // writer on the driver's side.
        unsafe {
            (d as *mut u64).write_volatile(addr);
            ((d + 8) as *mut u32).write_volatile(len);
            ((d + 12) as *mut u16).write_volatile(flags);
            ((d + 14) as *mut u16).write_volatile(0);
        }
    }

    /// Set the length of descriptor `id`, whose buffer `set_desc` gave (at most BUF_LEN).
    fn set_desc_len(&mut self, id: u16, len: u32) {
        assert!(id < self.size && len as usize <= BUF_LEN);
        let d = self.desc + 16 * usize::from(id);
        // SAFETY: id < size (asserted), so d + 8 is the u32 `len` field of descriptor `id`,
        // 8-aligned inside the page-aligned 16 × size-byte table; volatile raw write, no
        // reference (see `Virtq`). With len <= BUF_LEN the device stays inside the buffer
        // `set_desc`'s caller vouched for.
        unsafe { ((d + 8) as *mut u32).write_volatile(len) };
    }

    /// Point descriptor `id` at `[addr, addr + len)`, chained to `next` when `flags` has
    /// [`VIRTQ_DESC_F_NEXT`] (for the block driver's header, data and status chains).
    ///
    /// # Safety
    /// `[addr, addr + len)` must be memory that belongs to this queue's driver for the rest
    /// of the guest's life and that Rust code does not reference while the chain is posted:
    /// the device then reads it, or writes it with [`VIRTQ_DESC_F_WRITE`].
    pub(crate) unsafe fn set_desc_chained(
        &mut self,
        id: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        assert!(id < self.size && next < self.size);
        let d = self.desc + 16 * usize::from(id);
        // SAFETY: id < size (asserted), so [d, d + 16) is descriptor `id` inside the
        // 16 × size-byte, page-aligned table, each field aligned for its type; only volatile
        // raw accesses reach the table (see `Virtq`), and `&mut self` makes this the only
        // writer on the driver's side. What the device may do with [addr, addr + len) is
        // the caller's contract.
        unsafe {
            (d as *mut u64).write_volatile(addr);
            ((d + 8) as *mut u32).write_volatile(len);
            ((d + 12) as *mut u16).write_volatile(flags);
            ((d + 14) as *mut u16).write_volatile(next);
        }
    }

    /// Put descriptor `id` in the avail ring (not yet visible: see [`Virtq::publish`]).
    pub(crate) fn push_avail(&mut self, id: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: slot = avail_idx % size < size, so avail + 4 + 2 × slot is `ring[slot]`,
        // a 2-aligned u16 inside the 6 + 2 × size-byte avail ring (page-aligned); volatile
        // raw write, no reference to the ring exists (see `Virtq`).
        unsafe { ((self.avail + 4 + 2 * slot) as *mut u16).write_volatile(id) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Make pushed entries visible to the device.
    pub(crate) fn publish(&mut self) {
        fence(Ordering::Release);
        // SAFETY: avail + 2 is the avail ring's u16 `idx`, 2-aligned inside its allocation;
        // volatile raw write (see `Virtq`). The Release fence above keeps the descriptor
        // and ring-entry stores before it, so the device sees them with the new index.
        unsafe { ((self.avail + 2) as *mut u16).write_volatile(self.avail_idx) };
    }

    pub(crate) fn set_avail_flags(&mut self, flags: u16) {
        // SAFETY: avail + 0 is the avail ring's u16 `flags`, at the start of its page-aligned
        // allocation; volatile raw write (see `Virtq`). The device only reads it, as a hint.
        unsafe { (self.avail as *mut u16).write_volatile(flags) };
    }

    pub(crate) fn used_idx(&self) -> u16 {
        // SAFETY: used + 2 is the used ring's u16 `idx`, 2-aligned inside its allocation.
        // The device writes it by DMA at any time, which is why it is read volatile through
        // a raw pointer and no reference to the ring exists (see `Virtq`).
        unsafe { ((self.used + 2) as *const u16).read_volatile() }
    }

    fn used_flags(&self) -> u16 {
        // SAFETY: used + 0 is the used ring's u16 `flags`, at the start of its page-aligned
        // allocation; device-written, so read volatile through a raw pointer (see `Virtq`).
        unsafe { (self.used as *const u16).read_volatile() }
    }

    pub(crate) fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Take the next used element: (descriptor id, bytes written).
    pub(crate) fn pop_used(&mut self) -> Option<(u16, u32)> {
        if !self.has_used() {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        let e = self.used + 4 + 8 * slot;
        // SAFETY: slot = last_used % size < size, so [e, e + 8) is `ring[slot]` (u32 id,
        // u32 len), 4-aligned inside the 6 + 8 × size-byte used ring; device-written, so
        // read volatile through raw pointers (see `Virtq`). The device filled this element
        // before moving `idx` past it, and the Acquire fence keeps these reads after the
        // read of `idx`.
        let (id, len) = unsafe {
            (
                ((e) as *const u32).read_volatile(),
                ((e + 4) as *const u32).read_volatile(),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        if id >= u32::from(self.size) {
            panic!(
                "virtio queue {}: device returned bad descriptor id {id}",
                self.queue_index
            );
        }
        Some((id as u16, len))
    }

    /// Notify the device, unless it asked not to be.
    pub(crate) fn kick(&mut self) -> bool {
        mb();
        if self.used_flags() & VIRTQ_USED_F_NO_NOTIFY != 0 {
            return false;
        }
        mmio_write16(self.notify, self.queue_index);
        true
    }
}

/// Receive side: every descriptor owns one buffer for good.
pub struct RxQueue {
    q: Virtq,
    bufs: usize,
    /// Buffers given back to the avail ring since the last kick decision.
    reposted: u16,
    pub packets: u64,
    pub bytes: u64,
    pub kicks: u64,
    pub bad_len: u64,
}

/// Transmit side: a stack of free descriptors, each with its own buffer.
pub struct TxQueue {
    q: Virtq,
    bufs: usize,
    free: Vec<u16>,
    kick_pending: bool,
    pub packets: u64,
    pub bytes: u64,
    pub kicks: u64,
    pub dropped: u64,
}

impl TxQueue {
    /// Return completed descriptors to the free stack.
    pub fn reclaim(&mut self) {
        while let Some((id, _)) = self.q.pop_used() {
            self.free.push(id);
        }
    }

    fn buf(&self, id: u16) -> *mut u8 {
        (self.bufs + BUF_LEN * usize::from(id)) as *mut u8
    }

    /// Send one frame built by `f` into a `len`-byte buffer. Without a free descriptor the
    /// frame is built into scratch space and dropped.
    fn send<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        if self.free.is_empty() {
            self.reclaim();
        }
        let len = len.min(BUF_LEN - NET_HDR_LEN);
        let Some(id) = self.free.pop() else {
            self.dropped += 1;
            let mut scratch = [0u8; BUF_LEN];
            return f(&mut scratch[..len]);
        };
        let buf = self.buf(id);
        // SAFETY: `id` came off the free stack, so the device does not own descriptor `id`
        // (it was never posted, or `pop_used` gave it back) and will not read its buffer
        // until it is posted below. The buffer, bufs + BUF_LEN × id, is BUF_LEN bytes inside
        // the tx_bufs allocation (id < size: set at init or checked by `pop_used`), reached
        // only through this queue, which `&mut self` holds. NET_HDR_LEN + len <= BUF_LEN, so
        // the zeroed header and the `len`-byte slice after it are inside it, and any byte
        // is a valid u8. The slice goes to `f`, which must take a slice of any lifetime, so
        // R cannot borrow from it: it is dead before the descriptor is posted.
        let frame = unsafe {
            core::ptr::write_bytes(buf, 0, NET_HDR_LEN);
            core::slice::from_raw_parts_mut(buf.add(NET_HDR_LEN), len)
        };
        let r = f(frame);
        self.q.set_desc_len(id, (NET_HDR_LEN + len) as u32);
        self.q.push_avail(id);
        self.q.publish();
        self.kick_pending = true;
        self.packets += 1;
        self.bytes += len as u64;
        r
    }

    /// Kick the device if frames were queued since the last kick.
    pub fn flush(&mut self) {
        if self.kick_pending {
            self.kick_pending = false;
            if self.q.kick() {
                self.kicks += 1;
            }
        }
    }

    pub fn has_free(&self) -> bool {
        !self.free.is_empty()
    }
}

impl RxQueue {
    fn buf(&self, id: u16) -> *const u8 {
        (self.bufs + BUF_LEN * usize::from(id)) as *const u8
    }

    fn repost(&mut self, id: u16) {
        self.q.push_avail(id);
        self.q.publish();
        self.reposted += 1;
    }

    /// Kick the device if it may be short of buffers ([`crate::ring::rx_needs_kick`]).
    pub fn flush(&mut self) {
        if self.reposted == 0 {
            return;
        }
        let kick = crate::ring::rx_needs_kick(
            self.q.avail_idx,
            self.q.used_idx(),
            self.reposted,
            self.q.size,
        );
        self.reposted = 0;
        if kick && self.q.kick() {
            self.kicks += 1;
        }
    }
}

/// Features and identity of the device, for the boot log.
#[derive(Debug, Clone, Copy)]
pub struct NetInfo {
    pub pci: PciFunction,
    pub mac: [u8; 6],
    pub mac_from_device: bool,
    pub features: u64,
    pub rx_size: u16,
    pub tx_size: u16,
    pub link_up: bool,
}

/// The driver.
pub struct VirtioNet {
    common: usize,
    device_cfg: usize,
    pub rx: RxQueue,
    pub tx: TxQueue,
    pub info: NetInfo,
}

pub(crate) struct Caps {
    pub(crate) common: Option<usize>,
    pub(crate) notify: Option<(usize, u32)>,
    pub(crate) isr: Option<usize>,
    pub(crate) device: Option<usize>,
    pub(crate) msix: Option<u8>,
}

pub(crate) fn read_caps(f: PciFunction) -> Caps {
    let mut caps = Caps {
        common: None,
        notify: None,
        isr: None,
        device: None,
        msix: None,
    };
    for at in f.capabilities() {
        match f.read8(at) {
            0x09 => {
                let cfg_type = f.read8(at + 3);
                let bar = f.read8(at + 4);
                let offset = f.read32(at + 8);
                let Some(base) = f.bar_address(bar) else {
                    continue;
                };
                let addr = (base + u64::from(offset)) as usize;
                match cfg_type {
                    CAP_COMMON if caps.common.is_none() => caps.common = Some(addr),
                    CAP_NOTIFY if caps.notify.is_none() => {
                        caps.notify = Some((addr, f.read32(at + 16)));
                    }
                    CAP_ISR if caps.isr.is_none() => caps.isr = Some(addr),
                    CAP_DEVICE if caps.device.is_none() => caps.device = Some(addr),
                    _ => {}
                }
            }
            0x11 if caps.msix.is_none() => caps.msix = Some(at),
            _ => {}
        }
    }
    caps
}

/// A virtio-pci modern function being brought up (virtio 1.x §3.1.1): its structures, found
/// by [`read_caps`]. The steps every driver here takes, in the specification's order:
/// [`Transport::begin`] (reset, ACKNOWLEDGE | DRIVER, the offered features),
/// [`Transport::accept`] (FEATURES_OK), [`Transport::msix`], [`Transport::queue`] per
/// queue; the driver then enables its queues and sets DRIVER_OK.
pub(crate) struct Transport {
    pub(crate) common: usize,
    notify_base: usize,
    notify_mult: u32,
    pub(crate) device_cfg: usize,
    msix: u8,
}

impl Transport {
    /// Finds the function's structures, enables it, resets the device (waiting for the
    /// reset to take) and acknowledges it; returns it with the features the device offers,
    /// which must include VERSION_1.
    pub(crate) fn begin(f: PciFunction) -> Result<(Transport, u64), InitError> {
        let caps = read_caps(f);
        let common = caps
            .common
            .ok_or("no virtio common configuration capability")?;
        let (notify_base, notify_mult) = caps.notify.ok_or("no virtio notify capability")?;
        let device_cfg = caps
            .device
            .ok_or("no virtio device configuration capability")?;
        let msix = caps.msix.ok_or("no MSI-X capability")?;
        f.enable_memory_and_bus_master();
        let t = Transport {
            common,
            notify_base,
            notify_mult,
            device_cfg,
            msix,
        };
        // Reset, and wait for the device to acknowledge it.
        t.status(0);
        let mut spins = 0;
        while t.device_status() != 0 {
            spins += 1;
            if spins > 1_000_000 {
                return Err("device did not reset");
            }
            core::hint::spin_loop();
        }
        t.status(STATUS_ACKNOWLEDGE);
        t.status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            mmio_write32(common + C_DEVICE_FEATURE_SELECT, sel);
            offered |= u64::from(mmio_read32(common + C_DEVICE_FEATURE)) << (32 * sel);
        }
        if offered & F_VERSION_1 == 0 {
            return Err(t.fail("device does not offer VIRTIO_F_VERSION_1"));
        }
        Ok((t, offered))
    }

    pub(crate) fn status(&self, s: u8) {
        mmio_write8(self.common + C_DEVICE_STATUS, s);
    }

    pub(crate) fn device_status(&self) -> u8 {
        mmio_read8(self.common + C_DEVICE_STATUS)
    }

    /// Sets FAILED (the driver gives up on the device) and returns `why`.
    pub(crate) fn fail(&self, why: InitError) -> InitError {
        self.status(STATUS_FAILED);
        why
    }

    /// Writes the driver's `features`, sets FEATURES_OK and checks the device kept it, and
    /// that the device has at least `queues` queues (`too_few` if not). Returns the status
    /// written, to which the driver adds DRIVER_OK.
    pub(crate) fn accept(
        &self,
        features: u64,
        queues: u16,
        too_few: InitError,
    ) -> Result<u8, InitError> {
        let common = self.common;
        for sel in 0..2u32 {
            mmio_write32(common + C_DRIVER_FEATURE_SELECT, sel);
            mmio_write32(common + C_DRIVER_FEATURE, (features >> (32 * sel)) as u32);
        }
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.status(s);
        if self.device_status() & STATUS_FEATURES_OK == 0 {
            return Err(self.fail("device refused our features (FEATURES_OK not set)"));
        }
        if mmio_read16(common + C_NUM_QUEUES) < queues {
            return Err(self.fail(too_few));
        }
        Ok(s)
    }

    /// Enables MSI-X on `f` and programs `entries` (table entry, CPU vector) to LAPIC
    /// `apic_id`: enabled with the function masked, the table written, then unmasked.
    /// `too_small` if the table has fewer entries than the highest one given.
    pub(crate) fn msix(
        &self,
        f: PciFunction,
        apic_id: u8,
        entries: &[(usize, u8)],
        too_small: InitError,
    ) -> Result<(), InitError> {
        let msix = self.msix;
        let msg_ctl = f.read16(msix + 2);
        let table_size = usize::from(msg_ctl & 0x7FF) + 1;
        if entries.iter().any(|&(e, _)| e >= table_size) {
            return Err(self.fail(too_small));
        }
        let table_reg = f.read32(msix + 4);
        let table_bar = f
            .bar_address((table_reg & 7) as u8)
            .ok_or("MSI-X table BAR unassigned")?;
        let table = (table_bar + u64::from(table_reg & !7)) as usize;
        f.write16(msix + 2, msg_ctl | 0x8000 | 0x4000);
        for &(entry, vector) in entries {
            let e = table + 16 * entry;
            mmio_write32(e, 0xFEE0_0000 | (u32::from(apic_id) << 12));
            mmio_write32(e + 4, 0);
            mmio_write32(e + 8, u32::from(vector));
            mmio_write32(e + 12, 0); // unmask
        }
        f.write16(msix + 2, (msg_ctl | 0x8000) & !0x4000);
        Ok(())
    }

    /// Sets up queue `index`: the largest power-of-two size ≤ both the device's and
    /// `max_size`, refused (`too_short`) below `min_size` entries, its completions on
    /// MSI-X entry `vector`. Sets FAILED on any error.
    pub(crate) fn queue(
        &self,
        index: u16,
        vector: u16,
        max_size: u16,
        (min_size, too_short): (u16, InitError),
    ) -> Result<Virtq, InitError> {
        let common = self.common;
        mmio_write16(common + C_QUEUE_SELECT, index);
        let max = mmio_read16(common + C_QUEUE_SIZE);
        if max == 0 || max < min_size {
            return Err(self.fail(too_short));
        }
        // Split virtqueue sizes must be powers of two; take the largest <= both limits.
        let mut size = max.min(max_size);
        size = 1 << (15 - size.leading_zeros());
        let notify_off = mmio_read16(common + C_QUEUE_NOTIFY_OFF);
        let notify = self.notify_base + usize::from(notify_off) * self.notify_mult as usize;
        let q = Virtq::alloc(size, notify, index).inspect_err(|_| self.status(STATUS_FAILED))?;
        mmio_write16(common + C_QUEUE_SIZE, size);
        mmio_write64(common + C_QUEUE_DESC, q.desc as u64);
        mmio_write64(common + C_QUEUE_DRIVER, q.avail as u64);
        mmio_write64(common + C_QUEUE_DEVICE, q.used as u64);
        mmio_write16(common + C_QUEUE_MSIX_VECTOR, vector);
        if mmio_read16(common + C_QUEUE_MSIX_VECTOR) == NO_VECTOR {
            return Err(self.fail("device refused a queue MSI-X vector"));
        }
        Ok(q)
    }
}

impl VirtioNet {
    /// Bring up the device at `f` (virtio 1.x initialization sequence, MSI-X to LAPIC
    /// `apic_id`).
    pub fn init(f: PciFunction, apic_id: u8) -> Result<VirtioNet, InitError> {
        let (t, offered) = Transport::begin(f)?;
        let (common, device_cfg) = (t.common, t.device_cfg);
        let status = |s: u8| t.status(s);
        let features = offered & (F_VERSION_1 | F_MAC | F_STATUS);
        let s = t.accept(features, 2, "device has fewer than 2 queues")?;

        // MSI-X: entry 0 = config changes, 1 = RX, 2 = TX.
        t.msix(
            f,
            apic_id,
            &[(0, VEC_CONFIG), (1, VEC_RX), (2, VEC_TX)],
            "MSI-X table has fewer than 3 entries",
        )?;
        mmio_write16(common + C_MSIX_CONFIG, 0);
        if mmio_read16(common + C_MSIX_CONFIG) == NO_VECTOR {
            return Err(t.fail("device refused MSI-X vector 0 for config changes"));
        }

        let available = (1, "queue not available");
        let rxq = t.queue(0, 1, MAX_QUEUE_SIZE, available)?;
        let txq = t.queue(1, 2, MAX_QUEUE_SIZE, available)?;

        // RX: every descriptor gets a device-writable buffer, all posted.
        let rx_bufs = alloc_pages(BUF_LEN * usize::from(rxq.size))?;
        let mut rx = RxQueue {
            q: rxq,
            bufs: rx_bufs,
            reposted: 0,
            packets: 0,
            bytes: 0,
            kicks: 0,
            bad_len: 0,
        };
        for id in 0..rx.q.size {
            let addr = rx.bufs + BUF_LEN * usize::from(id);
            // SAFETY: [addr, addr + BUF_LEN) is buffer `id` (id < size) of rx_bufs, an
            // allocation of BUF_LEN × size bytes that is never freed and that only this
            // queue knows; Rust code reads a buffer only through an `RxToken`, after the
            // device has returned it and before it is reposted.
            unsafe {
                rx.q.set_desc(id, addr as u64, BUF_LEN as u32, VIRTQ_DESC_F_WRITE)
            };
            rx.q.push_avail(id);
        }
        rx.q.publish();

        // TX: descriptors point at their buffers; lengths are set per packet. Completion
        // interrupts are off unless we run out of descriptors.
        let tx_bufs = alloc_pages(BUF_LEN * usize::from(txq.size))?;
        let mut tx = TxQueue {
            q: txq,
            bufs: tx_bufs,
            free: Vec::with_capacity(usize::from(MAX_QUEUE_SIZE)),
            kick_pending: false,
            packets: 0,
            bytes: 0,
            kicks: 0,
            dropped: 0,
        };
        for id in (0..tx.q.size).rev() {
            let addr = tx.bufs + BUF_LEN * usize::from(id);
            // SAFETY: [addr, addr + BUF_LEN) is buffer `id` (id < size) of tx_bufs, an
            // allocation of BUF_LEN × size bytes that is never freed and that only this
            // queue knows; `TxQueue::send` writes a buffer only while its descriptor is free
            // (not posted), and the device only reads it.
            unsafe { tx.q.set_desc(id, addr as u64, 0, 0) };
            tx.free.push(id);
        }
        tx.q.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT);
        // RX interrupts on until the main loop is busy.
        rx.q.set_avail_flags(0);

        for index in 0..2u16 {
            mmio_write16(common + C_QUEUE_SELECT, index);
            mmio_write16(common + C_QUEUE_ENABLE, 1);
        }

        let mac_from_device = features & F_MAC != 0;
        let mut mac = [0x02, 0x74, 0x77, 0x69, 0x6e, 0x01];
        if mac_from_device {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = mmio_read8(device_cfg + i);
            }
        }
        status(s | STATUS_DRIVER_OK);
        if mmio_read8(common + C_DEVICE_STATUS) & STATUS_FAILED != 0 {
            return Err("device failed after DRIVER_OK");
        }
        rx.kick_now();

        let mut net = VirtioNet {
            common,
            device_cfg,
            info: NetInfo {
                pci: f,
                mac,
                mac_from_device,
                features,
                rx_size: rx.q.size,
                tx_size: tx.q.size,
                link_up: true,
            },
            rx,
            tx,
        };
        net.info.link_up = net.link_up();
        Ok(net)
    }

    /// Link status (always up without VIRTIO_NET_F_STATUS).
    pub fn link_up(&self) -> bool {
        if self.info.features & F_STATUS == 0 {
            return true;
        }
        mmio_read16(self.device_cfg + 6) & 1 != 0
    }

    /// Has the device set DEVICE_NEEDS_RESET (it stopped using our queues)?
    pub fn needs_reset(&self) -> bool {
        mmio_read8(self.common + C_DEVICE_STATUS) & STATUS_NEEDS_RESET != 0
    }

    /// Push out queued frames and refilled buffers.
    pub fn flush(&mut self) {
        self.tx.flush();
        self.rx.flush();
    }

    /// Suppress RX interrupts: the main loop is polling.
    pub fn busy(&mut self) {
        self.rx.q.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT);
    }

    /// About to halt: re-enable the interrupts we need to be woken by (RX always, TX only
    /// while out of descriptors), then look once more. Returns `true` if there is work
    /// after all (do not halt).
    pub fn prepare_idle(&mut self) -> bool {
        self.rx.q.set_avail_flags(0);
        let tx_starved = !self.tx.has_free();
        self.tx.q.set_avail_flags(if tx_starved {
            0
        } else {
            VIRTQ_AVAIL_F_NO_INTERRUPT
        });
        mb();
        self.rx.q.has_used() || (tx_starved && self.tx.q.has_used())
    }

    /// Send a raw Ethernet frame built by `f`.
    pub fn send_frame(&mut self, len: usize, f: impl FnOnce(&mut [u8])) {
        self.tx.send(len, f);
    }
}

impl RxQueue {
    fn kick_now(&mut self) {
        if self.q.kick() {
            self.kicks += 1;
        }
    }
}

/// A received frame: buffer `id` goes back to the device when the token is dropped.
pub struct RxToken<'a> {
    rx: &'a mut RxQueue,
    id: u16,
    len: usize,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // SAFETY: `receive` took `id` from the used ring (`pop_used` checked id < size) and
        // checked NET_HDR_LEN < written <= BUF_LEN, so the `len` bytes after the header are
        // inside buffer `id` of the rx_bufs allocation. The device wrote them before it
        // returned the buffer (the Acquire fence in `pop_used` orders our reads after that)
        // and cannot write it again until `repost` puts `id` back in the avail ring, which
        // happens when this token drops, after `f` and the slice are gone.
        let frame =
            unsafe { core::slice::from_raw_parts(self.rx.buf(self.id).add(NET_HDR_LEN), self.len) };
        f(frame)
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        self.rx.repost(self.id);
    }
}

/// Permission to send one frame.
pub struct TxToken<'a> {
    tx: &'a mut TxQueue,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.tx.send(len, f)
    }
}

impl Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _ts: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        loop {
            let (id, written) = self.rx.q.pop_used()?;
            let written = written as usize;
            if written <= NET_HDR_LEN || written > BUF_LEN {
                self.rx.bad_len += 1;
                self.rx.repost(id);
                continue;
            }
            let len = written - NET_HDR_LEN;
            self.rx.packets += 1;
            self.rx.bytes += len as u64;
            return Some((
                RxToken {
                    rx: &mut self.rx,
                    id,
                    len,
                },
                TxToken { tx: &mut self.tx },
            ));
        }
    }

    fn transmit(&mut self, _ts: Instant) -> Option<TxToken<'_>> {
        if !self.tx.has_free() {
            self.tx.reclaim();
            if !self.tx.has_free() {
                return None;
            }
        }
        Some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps.max_burst_size = None;
        caps
    }
}
