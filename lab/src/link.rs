//! Virtual network devices inside harness namespaces: bridges, veth pairs and persistent
//! TAPs. Each holds its namespace alive and deletes itself on drop.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use crate::error::{HarnessError, Result};
use crate::netns::Netns;
use crate::sys;

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_IFNAME
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        return Err(HarnessError::InvalidArgument(format!(
            "bad interface name {name:?} (1..={MAX_IFNAME} of [A-Za-z0-9_.-])"
        )));
    }
    Ok(())
}

/// Deletes a link, ignoring errors (the namespace may be going away, or deleting a veth's
/// other end already removed it).
fn delete_link(ns: &Netns, name: &str) {
    let _ = ns.output(
        &["ip", "link", "delete", name],
        crate::cmd::DEFAULT_COMMAND_TIMEOUT,
    );
}

/// A Linux bridge, up, with STP off (ports forward as soon as they have carrier).
#[derive(Debug)]
pub struct Bridge {
    ns: Netns,
    name: String,
}

impl Bridge {
    /// Creates bridge `name` in `ns` and brings it up.
    pub fn create(ns: &Netns, name: &str) -> Result<Self> {
        check_ifname(name)?;
        ns.run(&[
            "ip",
            "link",
            "add",
            name,
            "type",
            "bridge",
            "stp_state",
            "0",
        ])?;
        let br = Self {
            ns: ns.clone(),
            name: name.to_string(),
        };
        ns.link_up(name)?;
        Ok(br)
    }

    /// Makes `ifname` (in the same namespace) a port of this bridge and brings it up.
    pub fn enslave(&self, ifname: &str) -> Result<()> {
        self.ns
            .run(&["ip", "link", "set", ifname, "master", &self.name, "up"])
            .map(drop)
    }

    /// Whether `ifname` is a port of this bridge.
    pub fn has_port(&self, ifname: &str) -> Result<bool> {
        let out = self
            .ns
            .run(&["ip", "-o", "link", "show", "master", &self.name])?;
        Ok(out.lines().any(|l| {
            l.split(':')
                .nth(1)
                .map(|n| n.trim().split('@').next() == Some(ifname))
                .unwrap_or(false)
        }))
    }

    /// The bridge's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace it lives in.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        delete_link(&self.ns, &self.name);
    }
}

/// A veth pair with one end in each of two namespaces (which may be the same), both up.
#[derive(Debug)]
pub struct Veth {
    a: Netns,
    a_name: String,
    b: Netns,
    b_name: String,
}

impl Veth {
    /// Creates `a_name` in `a` paired with `b_name` in `b`, and brings both up.
    pub fn create(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<Self> {
        check_ifname(a_name)?;
        check_ifname(b_name)?;
        a.run(&[
            "ip",
            "link",
            "add",
            a_name,
            "type",
            "veth",
            "peer",
            "name",
            b_name,
            "netns",
            b.name(),
        ])?;
        let veth = Self {
            a: a.clone(),
            a_name: a_name.to_string(),
            b: b.clone(),
            b_name: b_name.to_string(),
        };
        a.link_up(a_name)?;
        b.link_up(b_name)?;
        Ok(veth)
    }

    /// The first end: its namespace and name.
    pub fn a(&self) -> (&Netns, &str) {
        (&self.a, &self.a_name)
    }

    /// The second end: its namespace and name.
    pub fn b(&self) -> (&Netns, &str) {
        (&self.b, &self.b_name)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting one end deletes the pair.
        delete_link(&self.a, &self.a_name);
    }
}

/// How to create a persistent TAP. The VMM attaches with its own flags; only multi-queue must
/// match between creation and attach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapOptions {
    /// Create it `multi_queue`.
    pub multi_queue: bool,
    /// Create it with `vnet_hdr` (the attaching process may change this).
    pub vnet_hdr: bool,
}

/// A persistent TAP (`ip tuntap add mode tap`) in a namespace, for a VMM started in that same
/// namespace to attach to by name.
#[derive(Debug)]
pub struct Tap {
    ns: Netns,
    name: String,
    options: TapOptions,
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Creates TAP `name` in `ns`, administratively up (it has carrier only while a process
    /// has it open).
    pub fn create(ns: &Netns, name: &str, options: TapOptions) -> Result<Self> {
        check_ifname(name)?;
        let mut argv = vec!["ip", "tuntap", "add", "dev", name, "mode", "tap"];
        if options.multi_queue {
            argv.push("multi_queue");
        }
        if options.vnet_hdr {
            argv.push("vnet_hdr");
        }
        ns.run(&argv)?;
        let tap = Self {
            ns: ns.clone(),
            name: name.to_string(),
            options,
        };
        ns.link_up(name)?;
        Ok(tap)
    }

    /// The TAP's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace it lives in.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// Attaches to the TAP from the test process (as a VMM would, without a vnet header), to
    /// see and inject raw Ethernet frames. The TAP has carrier while the handle lives.
    pub fn open(&self) -> Result<TapHandle> {
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        if self.options.multi_queue {
            req.flags |= IFF_MULTI_QUEUE;
        }
        for (dst, src) in req.name.iter_mut().zip(self.name.bytes()) {
            *dst = src as libc::c_char;
        }
        let file = self.ns.enter(|| -> std::io::Result<File> {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")?;
            // SAFETY: TUNSETIFF reads an `ifreq`; `req` is a properly sized and initialised
            // `#[repr(C)]` ifreq (name + flags + padding to 40 bytes) that outlives the call.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(file)
        })?;
        let file = file.map_err(|e| {
            HarnessError::io(
                format!("attaching to TAP {} in {}", self.name, self.ns.name()),
                e,
            )
        })?;
        Ok(TapHandle {
            file,
            name: self.name.clone(),
        })
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        delete_link(&self.ns, &self.name);
    }
}

/// An open TAP queue: raw Ethernet frames in and out.
#[derive(Debug)]
pub struct TapHandle {
    file: File,
    name: String,
}

impl TapHandle {
    /// The next frame the TAP delivers, or `None` if none arrives within `timeout`.
    pub fn recv_frame(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let ready = sys::poll_readable(self.file.as_fd(), timeout)
            .map_err(|e| HarnessError::io(format!("polling TAP {}", self.name), e))?;
        if !ready {
            return Ok(None);
        }
        let mut buf = vec![0u8; 65536];
        let n = self
            .file
            .read(&mut buf)
            .map_err(|e| HarnessError::io(format!("reading TAP {}", self.name), e))?;
        buf.truncate(n);
        Ok(Some(buf))
    }

    /// Sends one Ethernet frame out of the TAP (towards the bridge).
    pub fn send_frame(&mut self, frame: &[u8]) -> Result<()> {
        self.file
            .write_all(frame)
            .map_err(|e| HarnessError::io(format!("writing TAP {}", self.name), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(check_ifname("tap0").is_ok());
        assert!(check_ifname("a-b_c.d").is_ok());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("sixteen-chars-xx").is_err());
        assert!(check_ifname("bad name").is_err());
    }

    #[test]
    fn ifreq_has_the_kernel_size() {
        assert_eq!(std::mem::size_of::<IfReqFlags>(), 40);
    }
}
