//! virtio-blk over virtio-pci (modern, virtio 1.x) with MSI-X: the driver of the store's
//! disk.
//!
//! One request at a time, synchronously: the caller waits (halting until the queue's
//! MSI-X interrupt) for the device to complete it. Each request is the three-descriptor
//! chain Linux's `virtio_blk` builds — header (type, sector), data, status byte — with the
//! data in one DMA buffer of [`MAX_IO`] bytes (or `size_max`, if the device offers less).
//! A flush is issued only after the writes it must cover have completed: the device may
//! complete requests in any order.

use crate::arch::{halt, irq_count, mb, IRQ_TOTAL, VEC_BLK};
use crate::pci::PciFunction;
use crate::virtio::*;
use core::sync::atomic::{fence, Ordering};

/// Modern virtio-blk PCI device ID.
pub const DEVICE_BLK: u16 = 0x1042;
/// Largest transfer per request.
pub const MAX_IO: usize = 64 << 10;
/// Bytes per sector (the unit of virtio-blk addresses).
pub const SECTOR: usize = 512;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// What the status byte holds until the device writes it.
const S_PENDING: u8 = 0xFF;

/// Queue size we ask for: one request of three descriptors is all we post.
const QUEUE_SIZE: u16 = 4;

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// The device answered `IOERR` (an I/O error on the host's image).
    Io,
    /// The device answered `UNSUPP`.
    Unsupported,
    /// Another status byte (or none written).
    Status(u8),
    /// The disk is read-only.
    ReadOnly,
    /// The range does not fit the disk or one request.
    Range,
}

impl BlkError {
    pub fn message(self) -> &'static str {
        match self {
            BlkError::Io => "I/O error",
            BlkError::Unsupported => "request not supported by the device",
            BlkError::Status(_) => "bad status from the device",
            BlkError::ReadOnly => "disk is read-only",
            BlkError::Range => "range outside the disk",
        }
    }
}

/// Features and identity of the device, for the boot log.
#[derive(Clone, Copy, Debug)]
pub struct BlkInfo {
    pub pci: PciFunction,
    /// Sectors of the disk.
    pub sectors: u64,
    pub read_only: bool,
    pub features: u64,
    pub queue_size: u16,
    /// Largest transfer per request (bytes, a multiple of [`SECTOR`]).
    pub max_io: usize,
}

/// The driver.
pub struct VirtioBlk {
    q: Virtq,
    /// 16-byte request header, then the status byte at +16 (one DMA page).
    hdr: usize,
    /// The data buffer, [`MAX_IO`] bytes.
    buf: usize,
    pub info: BlkInfo,
    pub requests: u64,
    pub errors: u64,
}

impl VirtioBlk {
    /// Brings up the device at `f` (virtio 1.x initialization, its queue's completions on
    /// MSI-X entry 0 to LAPIC `apic_id`, vector [`VEC_BLK`]).
    pub fn init(f: PciFunction, apic_id: u8) -> Result<VirtioBlk, InitError> {
        let (t, offered) = Transport::begin(f)?;
        let (common, device_cfg) = (t.common, t.device_cfg);
        let status = |s: u8| t.status(s);
        if offered & F_FLUSH == 0 && offered & F_RO == 0 {
            // Without FLUSH nothing written is known to be durable: the store's promise.
            return Err(t.fail("writable device does not offer VIRTIO_BLK_F_FLUSH"));
        }
        let features =
            offered & (F_VERSION_1 | F_FLUSH | F_RO | F_BLK_SIZE | F_SIZE_MAX | F_SEG_MAX);
        let s = t.accept(features, 1, "device has no queue")?;
        let cap_lo = u64::from(mmio_read32(device_cfg));
        let cap_hi = u64::from(mmio_read32(device_cfg + 4));
        let sectors = cap_lo | (cap_hi << 32);
        let mut max_io = MAX_IO;
        if features & F_SIZE_MAX != 0 {
            let size_max = mmio_read32(device_cfg + 8) as usize;
            max_io = max_io.min(size_max) / SECTOR * SECTOR;
        }
        if features & F_SEG_MAX != 0 && mmio_read32(device_cfg + 12) == 0 {
            return Err(t.fail("device allows no data segment (seg_max 0)"));
        }
        if features & F_BLK_SIZE != 0 && mmio_read32(device_cfg + 20) as usize != SECTOR {
            return Err(t.fail("device's logical block size is not 512 bytes"));
        }
        if max_io < SECTOR {
            return Err(t.fail("device's size_max is below one sector"));
        }

        // MSI-X: entry 0 = the request queue; no config-change interrupt.
        t.msix(f, apic_id, &[(0, VEC_BLK)], "MSI-X table is empty")?;
        mmio_write16(common + C_MSIX_CONFIG, NO_VECTOR);

        let mut q = t.queue(
            0,
            0,
            QUEUE_SIZE,
            (3, "request queue has fewer than 3 entries"),
        )?;
        let size = q.size;
        let hdr = alloc_pages(4096).inspect_err(|_| status(STATUS_FAILED))?;
        let buf = alloc_pages(MAX_IO).inspect_err(|_| status(STATUS_FAILED))?;
        // Completions interrupt: the driver halts until one comes.
        q.set_avail_flags(0);
        mmio_write16(common + C_QUEUE_ENABLE, 1);
        status(s | STATUS_DRIVER_OK);
        if mmio_read8(common + C_DEVICE_STATUS) & STATUS_FAILED != 0 {
            return Err("device failed after DRIVER_OK");
        }
        Ok(VirtioBlk {
            q,
            hdr,
            buf,
            info: BlkInfo {
                pci: f,
                sectors,
                read_only: features & F_RO != 0,
                features,
                queue_size: size,
                max_io,
            },
            requests: 0,
            errors: 0,
        })
    }

    /// Reads `out.len()` bytes (a multiple of [`SECTOR`], at most `max_io`) from `sector`.
    pub fn read(&mut self, sector: u64, out: &mut [u8]) -> Result<(), BlkError> {
        self.check(sector, out.len())?;
        self.request(T_IN, sector, out.len())?;
        // SAFETY: `buf` is this driver's MAX_IO-byte DMA allocation (never freed, only
        // this driver knows it) and out.len() <= max_io <= MAX_IO (checked). The device
        // returned the chain (`request` popped it from the used ring after an Acquire
        // fence), so it no longer writes the buffer, and `out` is a distinct Rust slice.
        unsafe {
            core::ptr::copy_nonoverlapping(self.buf as *const u8, out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// Writes `data` (a multiple of [`SECTOR`], at most `max_io` bytes) at `sector`.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), BlkError> {
        if self.info.read_only {
            return Err(BlkError::ReadOnly);
        }
        self.check(sector, data.len())?;
        // SAFETY: as in `read`: `buf` is ours, data.len() <= MAX_IO, and no request is
        // posted (requests are synchronous), so the device does not access the buffer now.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), self.buf as *mut u8, data.len()) };
        self.request(T_OUT, sector, data.len())
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> Result<(), BlkError> {
        if self.info.read_only {
            return Err(BlkError::ReadOnly);
        }
        self.request(T_FLUSH, 0, 0)
    }

    fn check(&self, sector: u64, len: usize) -> Result<(), BlkError> {
        let sectors = (len / SECTOR) as u64;
        if len == 0 || !len.is_multiple_of(SECTOR) || len > self.info.max_io {
            return Err(BlkError::Range);
        }
        match sector.checked_add(sectors) {
            Some(end) if end <= self.info.sectors => Ok(()),
            _ => Err(BlkError::Range),
        }
    }

    /// Posts one request and waits for its completion.
    fn request(&mut self, ty: u32, sector: u64, len: usize) -> Result<(), BlkError> {
        let status_at = self.hdr + 16;
        // SAFETY: `hdr` is this driver's page-aligned DMA page (never freed): the header's
        // fields at +0 (u32), +4 (u32), +8 (u64) and the status byte at +16 are inside it
        // and aligned. No request is posted, so the device does not access it now; only
        // volatile raw accesses reach it.
        unsafe {
            (self.hdr as *mut u32).write_volatile(ty);
            ((self.hdr + 4) as *mut u32).write_volatile(0);
            ((self.hdr + 8) as *mut u64).write_volatile(sector);
            (status_at as *mut u8).write_volatile(S_PENDING);
        }
        let data_flags = if ty == T_IN { VIRTQ_DESC_F_WRITE } else { 0 };
        // SAFETY: descriptors 0..3 < QUEUE_SIZE's minimum of 4 (a size below 3 is refused
        // at init and sizes are powers of two). The header (16 bytes), the data buffer
        // (len <= MAX_IO) and the status byte are this driver's DMA memory, never freed,
        // not referenced by Rust code while the chain is posted: `request` waits for the
        // device to return it before anyone touches them again.
        unsafe {
            if len == 0 {
                self.q
                    .set_desc_chained(0, self.hdr as u64, 16, VIRTQ_DESC_F_NEXT, 2);
            } else {
                self.q
                    .set_desc_chained(0, self.hdr as u64, 16, VIRTQ_DESC_F_NEXT, 1);
                self.q.set_desc_chained(
                    1,
                    self.buf as u64,
                    len as u32,
                    data_flags | VIRTQ_DESC_F_NEXT,
                    2,
                );
            }
            self.q
                .set_desc_chained(2, status_at as u64, 1, VIRTQ_DESC_F_WRITE, 0);
        }
        self.q.push_avail(0);
        self.q.publish();
        self.q.kick();
        self.requests += 1;
        loop {
            let seen = irq_count(IRQ_TOTAL);
            if let Some((id, _)) = self.q.pop_used() {
                if id != 0 {
                    panic!("virtio-blk: device returned descriptor {id}, not the chain's head 0");
                }
                break;
            }
            mb();
            if self.q.has_used() {
                continue;
            }
            halt(seen);
        }
        fence(Ordering::Acquire);
        // SAFETY: the status byte at hdr + 16 is in our DMA page; the device wrote it
        // before returning the chain (the Acquire fence in `pop_used` orders this read).
        let st = unsafe { (status_at as *const u8).read_volatile() };
        match st {
            S_OK => Ok(()),
            S_IOERR => {
                self.errors += 1;
                Err(BlkError::Io)
            }
            S_UNSUPP => {
                self.errors += 1;
                Err(BlkError::Unsupported)
            }
            other => {
                self.errors += 1;
                Err(BlkError::Status(other))
            }
        }
    }
}
