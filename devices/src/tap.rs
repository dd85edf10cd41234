//! TAP network devices: the host side of virtio-net.
//!
//! A [`Tap`] attaches to an existing TAP interface (created with `ip tuntap add`) in
//! non-blocking mode with a 12-byte virtio-net header (`virtio_net_hdr_v1`) in front of
//! every frame, the same header the guest driver uses, so frames pass through unchanged.
//! Offloads are off: the guest is offered no checksum/GSO features, so the kernel must hand
//! us complete, checksummed frames.
//!
//! Raw `TUNSETIFF`/`TUNSETVNETHDRSZ` ioctls rather than the `tun-tap` crate, which offers
//! neither `IFF_VNET_HDR` nor the header size that the header above needs.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

/// Length of the virtio-net header in front of every frame (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

const TUN_PATH: &str = "/dev/net/tun";
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUNTAP_IOC: u32 = b'T' as u32;

ioctl_iow_nr!(TUNSETIFF, TUNTAP_IOC, 202, ::std::os::raw::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP_IOC, 208, ::std::os::raw::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP_IOC, 216, ::std::os::raw::c_int);

/// `struct ifreq` as TUNSETIFF reads it: name then flags, padded to the kernel's size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

/// Errors attaching to a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} is empty, longer than 15 bytes or contains NUL")]
    InvalidName(String),
    #[error("TAP {0} does not exist (create it first, e.g. `ip tuntap add {0} mode tap`)")]
    NotFound(String),
    #[error("cannot open {TUN_PATH} for TAP {name}")]
    OpenTun {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot attach to TAP {name} (TUNSETIFF)")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the vnet header size of TAP {name} (TUNSETVNETHDRSZ)")]
    VnetHdrSize {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot turn offloads off on TAP {name} (TUNSETOFFLOAD)")]
    Offload {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// An open, non-blocking TAP queue with 12-byte vnet headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the TAP interface `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(TapError::InvalidName(name.to_owned()));
        }
        // TUNSETIFF on a name that does not exist would create a new, unbridged TAP and
        // leave the guest silently cut off; refuse instead.
        let cname =
            std::ffi::CString::new(bytes).map_err(|_| TapError::InvalidName(name.to_owned()))?;
        // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::NotFound(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| TapError::OpenTun {
                name: name.to_owned(),
                source,
            })?;

        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: `file` is an open tun fd and `req` is a valid, writable ifreq-sized struct
        // that outlives the call; the kernel writes at most sizeof(struct ifreq) into it.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
        if ret < 0 {
            return Err(TapError::Attach {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }

        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid for the
        // duration of the call.
        let ret = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr_len) };
        if ret < 0 {
            return Err(TapError::VnetHdrSize {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }

        // SAFETY: TUNSETOFFLOAD takes its flags by value; 0 turns all offloads off.
        let ret = unsafe { ioctl_with_val(&file, TUNSETOFFLOAD(), 0) };
        if ret < 0 {
            return Err(TapError::Offload {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        tracing::debug!(tap = name, "TAP attached");
        Ok(Self {
            file,
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame, vnet header first, into `buf`. `WouldBlock` when none is queued.
    pub fn read_vnet(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Reads and discards every frame waiting in the TAP; returns how many. For a TAP held
    /// open by a standby (the backup) whose queue filled with frames meant for nobody.
    pub fn drain(&self) -> usize {
        let mut buf = vec![0u8; 65550 + 12];
        let mut n = 0;
        while self.read_vnet(&mut buf).is_ok() {
            n += 1;
        }
        n
    }

    /// Writes one frame that starts with its 12-byte vnet header.
    pub fn write_vnet(&self, buf: &[u8]) -> io::Result<()> {
        let n = (&self.file).write(buf)?;
        if n != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "TAP accepted part of a frame",
            ));
        }
        Ok(())
    }

    /// Sends a plain Ethernet frame out of the TAP to the host side (e.g. a gratuitous ARP
    /// after failover); the vnet header is added here.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        let hdr = [0u8; VNET_HDR_LEN];
        let n = (&self.file).write_vectored(&[IoSlice::new(&hdr), IoSlice::new(frame)])?;
        if n != hdr.len() + frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "TAP accepted part of a frame",
            ));
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Test helpers that need `CAP_NET_ADMIN`: a throw-away TAP plus a packet socket on it.
#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A TAP the test created (persistent until [`Tap::open`], which refuses missing
    /// devices, has attached to it; then no longer, so it goes with its last fd), brought up, and an `AF_PACKET` socket
    /// bound to it: frames sent on the socket come out of the TAP's fd, frames written to
    /// the fd arrive on the socket. The tests need `CAP_NET_ADMIN` (they run as root) and
    /// fail, naming the step, without it: a skip would pass without testing anything.
    pub struct TestTap {
        pub tap: std::sync::Arc<Tap>,
        pub sock: OwnedFd,
    }

    ioctl_iow_nr!(TUNSETPERSIST, TUNTAP_IOC, 203, ::std::os::raw::c_int);

    /// Creates (`persist`) or removes a persistent TAP `name`.
    fn set_persistent(name: &str, persist: bool) -> io::Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(TUN_PATH)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `file` is an open tun fd and `req` a valid ifreq that outlives the call.
        if unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `file` is the tun fd just attached; TUNSETPERSIST takes an integer.
        if unsafe { ioctl_with_val(&file, TUNSETPERSIST(), u64::from(persist)) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn test_tap() -> Option<TestTap> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "twt{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        set_persistent(&name, true).unwrap_or_else(|e| {
            panic!("cannot create test TAP {name} (the TAP tests need CAP_NET_ADMIN): {e}")
        });
        let tap = match Tap::open(&name) {
            Ok(t) => t,
            Err(e) => {
                let _ = set_persistent(&name, false);
                panic!("cannot open the test TAP {name} just created: {e}");
            }
        };
        // SAFETY: `tap`'s fd is the tun fd attached to the device; TUNSETPERSIST takes an
        // integer. Not persistent any more: the device goes when the test's fds close.
        if unsafe { ioctl_with_val(&tap.file, TUNSETPERSIST(), 0) } < 0 {
            panic!(
                "cannot make the test TAP {name} transient: {}",
                io::Error::last_os_error()
            );
        }
        let cname = std::ffi::CString::new(name.clone()).ok()?;
        // SAFETY: plain syscalls on fds we own with valid, live arguments.
        unsafe {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            assert!(s >= 0);
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags: 0,
                _pad: [0; 22],
            };
            req.name[..name.len()].copy_from_slice(name.as_bytes());
            req.flags = (libc::IFF_UP | libc::IFF_NOARP) as i16;
            let ok = libc::ioctl(s, libc::SIOCSIFFLAGS, &mut req) == 0;
            libc::close(s);
            if !ok {
                let _ = set_persistent(&name, false);
                panic!("cannot bring the test TAP {name} up");
            }
            let ifindex = libc::if_nametoindex(cname.as_ptr());
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let p = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                i32::from(proto),
            );
            assert!(p >= 0);
            let sock = OwnedFd::from_raw_fd(p);
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            let r = libc::bind(
                p,
                std::ptr::addr_of!(sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0);
            Some(TestTap {
                tap: std::sync::Arc::new(tap),
                sock,
            })
        }
    }

    impl TestTap {
        /// Sends `frame` from the host side (it comes out of the TAP fd).
        pub fn inject(&self, frame: &[u8]) {
            // SAFETY: `frame` is a valid buffer for the duration of the call.
            let n =
                unsafe { libc::send(self.sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(n, frame.len() as isize);
        }

        /// Receives frames seen on the host side, skipping ones not from `src_mac` (the
        /// kernel may emit IPv6 router solicitations of its own on a fresh interface).
        pub fn capture(&self, src_mac: [u8; 6], timeout: std::time::Duration) -> Option<Vec<u8>> {
            let deadline = std::time::Instant::now() + timeout;
            let mut buf = vec![0u8; 65536];
            while std::time::Instant::now() < deadline {
                // SAFETY: `buf` is valid and writable for its length.
                let n = unsafe {
                    libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n >= 14 && buf[6..12] == src_mac {
                    return Some(buf[..n as usize].to_vec());
                }
                if n < 0 {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::test_tap;
    use super::*;
    use std::time::Duration;

    #[test]
    fn invalid_names_are_rejected() {
        assert!(matches!(Tap::open(""), Err(TapError::InvalidName(_))));
        assert!(matches!(
            Tap::open("a-very-long-interface-name"),
            Err(TapError::InvalidName(_))
        ));
        assert!(matches!(Tap::open("a\0b"), Err(TapError::InvalidName(_))));
    }

    #[test]
    fn error_names_the_tap_and_step() {
        let e = TapError::Attach {
            name: "tap7".into(),
            source: io::Error::from_raw_os_error(libc::EBUSY),
        };
        assert_eq!(e.to_string(), "cannot attach to TAP tap7 (TUNSETIFF)");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn frames_cross_the_tap_both_ways() {
        let Some(t) = test_tap() else { return };
        let mut buf = [0u8; 2048];
        assert_eq!(
            t.tap.read_vnet(&mut buf).map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::WouldBlock),
            "non-blocking and empty"
        );
        let mut frame = vec![0xffu8; 6];
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x42, 0x08, 0x06]);
        frame.resize(60, 0xab);
        t.tap.write_frame(&frame).unwrap();
        let got = t
            .capture([0x02, 0, 0, 0, 0, 0x42], Duration::from_secs(2))
            .expect("frame written to the TAP reaches the host side");
        assert_eq!(got, frame);

        let mut inbound = vec![0x02, 0, 0, 0, 0, 0x42];
        inbound.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x43, 0x08, 0x06]);
        inbound.resize(60, 0xcd);
        t.inject(&inbound);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            match t.tap.read_vnet(&mut buf) {
                Ok(n) if buf[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12] == inbound[6..12] => {
                    assert_eq!(&buf[VNET_HDR_LEN..n], &inbound[..]);
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "no inbound frame");
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}
