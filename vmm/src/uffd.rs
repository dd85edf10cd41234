//! The few userfaultfd operations a lazy restore needs, over the kernel's ABI
//! (`linux/userfaultfd.h`): create, register a range for missing-page faults, read fault
//! messages, and resolve them with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` / `UFFDIO_WAKE`.
//!
//! Written against the header rather than through the `userfaultfd` crate: that crate's
//! sys crate runs bindgen at build time, which needs libclang on every build machine, for
//! six ioctls whose layout is fixed ABI.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: the event byte, padding, then (for a page fault) flags, address and
/// thread id.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    flags: u64,
    address: u64,
    _ptid: u32,
    _pad: u32,
}

/// `struct uffdio_poison` (Linux 6.6): marks missing pages so that touching them is a
/// memory error (SIGBUS, or -EHWPOISON to KVM) instead of a fault to serve.
#[repr(C)]
#[derive(Default)]
struct UffdioPoison {
    range: UffdioRange,
    mode: u64,
    updated: i64,
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioPoison>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);

ioctl_iowr_nr!(UFFDIO_API_IOCTL, UFFDIO, 0x3F, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER_IOCTL, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER_IOCTL, UFFDIO, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE_IOCTL, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY_IOCTL, UFFDIO, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE_IOCTL, UFFDIO, 0x04, UffdioZeropage);
ioctl_iowr_nr!(UFFDIO_POISON_IOCTL, UFFDIO, 0x08, UffdioPoison);

/// What a copy or zero-page request did.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// That many bytes were filled (all, or fewer when a page in the range already was:
    /// the caller goes on after them).
    Done(usize),
    /// The first page of the range already exists (loaded meanwhile): never overwritten.
    Exists,
}

/// A userfaultfd.
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// A non-blocking userfaultfd that also takes faults from kernel mode (KVM's and the
    /// VMM's own accesses to guest memory), API handshake done.
    pub fn new() -> std::io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: plain syscall; the result is checked and, if an fd, owned below.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let uffd = Uffd { fd };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: the ioctl writes into `api`, a live struct of the layout it expects.
        let rc = unsafe { ioctl_with_mut_ref(&uffd.fd, UFFDIO_API_IOCTL(), &mut api) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(uffd)
    }

    /// Registers `len` bytes at `start` (page aligned) for missing-page faults.
    pub fn register(&self, start: usize, len: usize) -> std::io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: the ioctl reads the range and writes `ioctls` of a live struct.
        let rc = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER_IOCTL(), &mut reg) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Ends the registration: faults in the range are the kernel's again (and any waiting
    /// on it are woken).
    pub fn unregister(&self, start: usize, len: usize) -> std::io::Result<()> {
        let range = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: the ioctl only reads the range.
        let rc = unsafe { ioctl_with_ref(&self.fd, UFFDIO_UNREGISTER_IOCTL(), &range) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wakes whoever waits on a fault in `len` bytes at `start`.
    pub fn wake(&self, start: usize, len: usize) -> std::io::Result<()> {
        let range = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: the ioctl only reads the range.
        let rc = unsafe { ioctl_with_ref(&self.fd, UFFDIO_WAKE_IOCTL(), &range) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Fills the missing pages at `dst` with `src` atomically (a page already present
    /// stops the copy there) and wakes the faults waiting on them.
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes; `dst..dst + len` must lie in a
    /// registered range.
    pub unsafe fn copy(&self, src: *const u8, dst: usize, len: usize) -> std::io::Result<Fill> {
        let mut c = UffdioCopy {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: the caller vouches for the ranges; the ioctl writes `copy` of a live
        // struct.
        let rc = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_COPY_IOCTL(), &mut c) };
        filled(rc, c.copy)
    }

    /// Maps zero pages at the missing pages of `len` bytes at `dst` and wakes their faults.
    pub fn zeropage(&self, dst: usize, len: usize) -> std::io::Result<Fill> {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: dst as u64,
                len: len as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: the ioctl reads the range and writes `zeropage` of a live struct; the
        // kernel checks the range is registered.
        let rc = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_ZEROPAGE_IOCTL(), &mut z) };
        filled(rc, z.zeropage)
    }

    /// Poisons the missing pages of `len` bytes at `dst` and wakes their faults: whoever
    /// waits on them (a vCPU, KVM's async page-fault worker) gets a memory error instead
    /// of waiting forever, and nobody ever sees a zero page there.
    pub fn poison(&self, dst: usize, len: usize) -> std::io::Result<Fill> {
        let mut p = UffdioPoison {
            range: UffdioRange {
                start: dst as u64,
                len: len as u64,
            },
            mode: 0,
            updated: 0,
        };
        // SAFETY: the ioctl reads the range and writes `updated` of a live struct; the
        // kernel checks the range is registered.
        let rc = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_POISON_IOCTL(), &mut p) };
        filled(rc, p.updated)
    }

    /// The address of the next page fault, `None` if no message is waiting.
    pub fn next_fault(&self) -> std::io::Result<Option<u64>> {
        loop {
            let mut msg = UffdMsg::default();
            // SAFETY: reads at most one message into a live buffer of its size.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut msg as *mut UffdMsg).cast(),
                    std::mem::size_of::<UffdMsg>(),
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return match e.kind() {
                    std::io::ErrorKind::WouldBlock => Ok(None),
                    std::io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if n as usize != std::mem::size_of::<UffdMsg>() {
                return Err(std::io::Error::other(format!(
                    "a userfaultfd message of {n} bytes"
                )));
            }
            if msg.event == UFFD_EVENT_PAGEFAULT {
                let _ = msg.flags;
                return Ok(Some(msg.address));
            }
            // Other events (fork, remap, remove) were not asked for; skip any.
        }
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The result of a copy / zero-page ioctl: bytes filled, or that the first page exists.
fn filled(rc: i32, done: i64) -> std::io::Result<Fill> {
    if rc >= 0 {
        return Ok(Fill::Done(done.max(0) as usize));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // Part of the range was filled before a page that exists (`done` > 0), or the
        // address space was changing (`done` <= 0): the caller goes on or retries.
        Some(libc::EAGAIN) => Ok(Fill::Done(done.max(0) as usize)),
        Some(libc::EEXIST) => Ok(Fill::Exists),
        _ if done == -(libc::EEXIST as i64) => Ok(Fill::Exists),
        _ => Err(e),
    }
}
