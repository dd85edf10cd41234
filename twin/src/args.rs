//! Parsers for command-line values: sizes, IPv4 with prefix, MAC addresses, durations, and
//! the checks `clap` runs at parse time (exit 2, naming the value as the user typed it):
//! guest RAM sizes, TAP devices, control-socket paths, snapshot directories, `HOST:PORT`.

use std::net::Ipv4Addr;
use std::str::FromStr;

/// Errors parsing a command-line value. Each names the value it could not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgError {
    #[error("size `{0}` is not a number with an optional K, M or G suffix")]
    Size(String),
    #[error("address `{0}` is not an IPv4 address with a prefix length, like 10.0.0.2/24")]
    Cidr(String),
    #[error("MAC address `{0}` is not six hex bytes separated by colons")]
    Mac(String),
    #[error(
        "MAC address `{0}` is multicast (the low bit of its first byte is set); a NIC needs a \
         unicast address, like 52:54:00:12:34:56"
    )]
    MulticastMac(String),
    #[error("duration `{0}` is not a whole number followed by us, ms or s, like 25ms or 500us")]
    Duration(String),
    #[error("duration `{0}` must be positive")]
    NotPositive(String),
    #[error("disk `{0}` is not PATH or PATH,readonly")]
    Disk(String),
}

/// A disk image, `PATH` or `PATH,readonly` (`--disk`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub path: std::path::PathBuf,
    pub read_only: bool,
}

impl FromStr for Disk {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        let err = || ArgError::Disk(s.to_string());
        let (path, read_only) = match s.rsplit_once(',') {
            Some((p, "readonly" | "ro")) => (p, true),
            Some((p, "readwrite" | "rw")) => (p, false),
            Some(_) => return Err(err()),
            None => (s, false),
        };
        if path.is_empty() {
            return Err(err());
        }
        Ok(Disk {
            path: path.into(),
            read_only,
        })
    }
}

/// A byte size such as `256M`, `1G`, `4096`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        let err = || ArgError::Size(s.to_string());
        let t = s.trim();
        let (num, mult) = match t.char_indices().last().ok_or_else(err)? {
            (i, 'K' | 'k') => (&t[..i], 1u64 << 10),
            (i, 'M' | 'm') => (&t[..i], 1 << 20),
            (i, 'G' | 'g') => (&t[..i], 1 << 30),
            _ => (t, 1),
        };
        let n: u64 = num.parse().map_err(|_| err())?;
        n.checked_mul(mult).map(Size).ok_or_else(err)
    }
}

/// An IPv4 address with prefix length, `10.0.0.2/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl FromStr for Cidr {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        let err = || ArgError::Cidr(s.to_string());
        let (a, p) = s.split_once('/').ok_or_else(err)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| err())?;
        let prefix_len: u8 = p.parse().map_err(|_| err())?;
        if prefix_len == 0 || prefix_len > 32 || addr.is_unspecified() {
            return Err(err());
        }
        Ok(Cidr { addr, prefix_len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A MAC address, `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        let err = || ArgError::Mac(s.to_string());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in mac.iter_mut() {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        // Multicast MACs cannot be a NIC's address.
        if mac[0] & 1 != 0 {
            return Err(ArgError::MulticastMac(s.to_string()));
        }
        Ok(Mac(mac))
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A duration such as `25ms`, `1s`, `500us`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Millis(pub std::time::Duration);

impl FromStr for Millis {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        let err = || ArgError::Duration(s.to_string());
        let t = s.trim();
        let (num, unit_ns) = if let Some(n) = t.strip_suffix("ms") {
            (n, 1_000_000u64)
        } else if let Some(n) = t.strip_suffix("us") {
            (n, 1_000)
        } else if let Some(n) = t.strip_suffix('s') {
            (n, 1_000_000_000)
        } else {
            return Err(err());
        };
        let n: u64 = num.parse().map_err(|_| err())?;
        if n == 0 {
            return Err(ArgError::NotPositive(s.to_string()));
        }
        let ns = n.checked_mul(unit_ns).ok_or_else(err)?;
        Ok(Millis(std::time::Duration::from_nanos(ns)))
    }
}

/// Guest RAM granularity (huge-page sized, as the VMM maps it).
const MEM_ALIGN: u64 = 2 << 20;
/// The most guest RAM the VMM lays out (3 GiB below the MMIO hole, the rest above 4 GiB).
const MEM_MAX: u64 = twin_vmm::memory::MAX_MEM_SIZE;

/// `--mem`: a [`Size`] that the VMM takes, checked at parse time in the user's unit.
pub fn guest_mem(s: &str) -> Result<Size, String> {
    let size: Size = s.parse().map_err(|e: ArgError| e.to_string())?;
    if size.0 == 0 || size.0 % MEM_ALIGN != 0 {
        return Err(format!("{s} must be a multiple of 2M (and not 0)"));
    }
    if size.0 > MEM_MAX {
        return Err(format!(
            "{s} is more than {}G, the most guest RAM the VMM supports",
            MEM_MAX >> 30
        ));
    }
    Ok(size)
}

/// `--tap`: a valid interface name that, if it exists, is a TAP device (a missing one is
/// reported when the VM opens it, with how to create it). Asked of the kernel in this
/// process's network namespace (ethtool's driver info: `tun`, bus `tap`), not of /sys,
/// which shows the namespace that mounted it.
pub fn tap_device(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() >= libc::IFNAMSIZ || s.contains(['/', ' ', '\0']) {
        return Err(format!(
            "{s:?} is not an interface name (1 to 15 characters, no / or space)"
        ));
    }
    match tun_kind(s) {
        Ok(Some(kind)) if kind == "tap" => Ok(s.to_string()),
        Ok(Some(kind)) => Err(format!(
            "{s} is a {kind} device, not a TAP device (ip tuntap add NAME mode tap)"
        )),
        Ok(None) => Err(format!("{s} is not a TAP device")),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(s.to_string()),
        Err(e) => Err(format!("cannot tell whether {s} is a TAP device: {e}")),
    }
}

/// `ETHTOOL_GDRVINFO` (linux/ethtool.h).
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// `struct ethtool_drvinfo` (linux/ethtool.h): the libc crate does not have it.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    /// n_priv_flags, n_stats, testinfo_len, eedump_len, regdump_len.
    counts: [u32; 5],
}

/// `Some("tap")` / `Some("tun")` for a tun driver's device, `None` for any other device;
/// ENODEV when there is no such device.
fn tun_kind(name: &str) -> std::io::Result<Option<String>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = EthtoolDrvinfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        counts: [0; 5],
    };
    // SAFETY: all-zero is a valid ifreq (integers, arrays and a union of such).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = b as libc::c_char;
    }
    req.ifr_ifru.ifru_data = std::ptr::addr_of_mut!(info).cast();
    // SAFETY: `req` names the device and points at `info`, both live and writable for the
    // call; SIOCETHTOOL with ETHTOOL_GDRVINFO writes at most an ethtool_drvinfo into it.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            // A device without ethtool driver info (lo) is not a TAP.
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => Ok(None),
            _ => Err(e),
        };
    }
    let text = |b: &[u8]| {
        let bytes: Vec<u8> = b.iter().take_while(|&&c| c != 0).copied().collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    if text(&info.driver) != "tun" {
        return Ok(None);
    }
    Ok(Some(text(&info.bus_info)))
}

/// `--control`: a path that can be a control socket (not a directory, not another file).
pub fn control_path(s: &str) -> Result<std::path::PathBuf, String> {
    let p = std::path::PathBuf::from(s);
    if p.is_dir() {
        return Err(format!("{s} is a directory"));
    }
    crate::control::check_path(&p).map_err(|e| e.to_string())?;
    Ok(p)
}

/// A snapshot directory to restore: it must be a directory. What is inside is `restore`'s
/// to check (one line naming the file and what is wrong with it, exit 1: the hostile-snapshot
/// tests), since reading it is the restore itself.
pub fn snapshot_dir(s: &str) -> Result<std::path::PathBuf, String> {
    let p = std::path::PathBuf::from(s);
    match std::fs::metadata(&p) {
        Ok(m) if m.is_dir() => Ok(p),
        Ok(_) => Err(format!(
            "{s} is not a Twin snapshot: a file, not a snapshot directory"
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{s} is not a Twin snapshot: no such directory"))
        }
        Err(e) => Err(format!("{s} is not a Twin snapshot: {e}")),
    }
}

/// `HOST:PORT` (a name resolved when the process starts, an IPv4 or `[IPv6]` address).
pub fn host_port(s: &str) -> Result<String, String> {
    let bad = || format!("`{s}` is not HOST:PORT, like 10.0.0.3:7000");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks() {
        let d: Disk = "/var/a.img".parse().unwrap();
        assert_eq!((d.path.to_str(), d.read_only), (Some("/var/a.img"), false));
        let d: Disk = "b.img,readonly".parse().unwrap();
        assert_eq!((d.path.to_str(), d.read_only), (Some("b.img"), true));
        assert!("b.img,bogus".parse::<Disk>().is_err());
        assert!(",readonly".parse::<Disk>().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!("256M".parse(), Ok(Size(256 << 20)));
        assert_eq!("1g".parse(), Ok(Size(1 << 30)));
        assert_eq!("4096".parse(), Ok(Size(4096)));
        for bad in ["", "12Q", "M", "-1M", "99999999999999999999G"] {
            assert_eq!(bad.parse::<Size>(), Err(ArgError::Size(bad.into())));
        }
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.0.0.2/24".parse().unwrap();
        assert_eq!((c.addr, c.prefix_len), (Ipv4Addr::new(10, 0, 0, 2), 24));
        for bad in ["10.0.0.2", "10.0.0.2/33", "10.0.0/24", "0.0.0.0/8", "x/1"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn macs() {
        let m: Mac = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:12:34:56");
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "01:00:00:00:00:00",
            "zz:00:00:00:00:00",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        let e = "01:00:5e:00:00:01".parse::<Mac>().unwrap_err().to_string();
        assert!(e.contains("multicast"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(
            "25ms".parse(),
            Ok(Millis(std::time::Duration::from_millis(25)))
        );
        assert_eq!("2s".parse(), Ok(Millis(std::time::Duration::from_secs(2))));
        assert_eq!(
            "500us".parse(),
            Ok(Millis(std::time::Duration::from_micros(500)))
        );
        for bad in ["25", "0ms", "ms", "1h", "0.5ms"] {
            assert!(bad.parse::<Millis>().is_err(), "{bad}");
        }
        assert_eq!(
            "0ms".parse::<Millis>().unwrap_err().to_string(),
            "duration `0ms` must be positive"
        );
    }

    #[test]
    fn guest_memory_in_the_users_unit() {
        assert_eq!(guest_mem("256M"), Ok(Size(256 << 20)));
        assert_eq!(guest_mem("3G"), Ok(Size(3 << 30)));
        assert_eq!(
            guest_mem("3M").unwrap_err(),
            "3M must be a multiple of 2M (and not 0)"
        );
        assert!(guest_mem("0").unwrap_err().contains("multiple of 2M"));
        assert_eq!(guest_mem("16G"), Ok(Size(16 << 30)));
        assert_eq!(guest_mem("64G"), Ok(Size(64 << 30)));
        assert!(guest_mem("65G").unwrap_err().contains("more than 64G"));
        assert!(guest_mem("12Q").unwrap_err().contains("12Q"));
    }

    #[test]
    fn host_ports() {
        assert!(host_port("10.0.0.3:7000").is_ok());
        assert!(host_port("backup.example:7000").is_ok());
        assert!(host_port("[::1]:7000").is_ok());
        for bad in ["nohost", "nohost:", ":7000", "h:0", "h:99999"] {
            assert!(host_port(bad).unwrap_err().contains("HOST:PORT"), "{bad}");
        }
    }

    #[test]
    fn lo_is_not_a_tap() {
        assert_eq!(tap_device("lo").unwrap_err(), "lo is not a TAP device");
        // A missing device is left to the VM's open, which says how to create it.
        assert_eq!(tap_device("twtnosuch0").as_deref(), Ok("twtnosuch0"));
        assert!(tap_device("a/b").is_err());
    }

    #[test]
    fn snapshot_dirs() {
        let dir = std::env::temp_dir();
        assert!(snapshot_dir(&dir.display().to_string()).is_ok());
        let e = snapshot_dir("/nonexistent/snap1").unwrap_err();
        assert!(
            e.contains("is not a Twin snapshot: no such directory"),
            "{e}"
        );
        let e = snapshot_dir("/proc/self/status").unwrap_err();
        assert!(e.contains("a file, not a snapshot directory"), "{e}");
    }

    #[test]
    fn control_paths() {
        let dir = std::env::temp_dir();
        assert!(control_path(dir.to_str().unwrap())
            .unwrap_err()
            .ends_with("is a directory"));
        assert!(control_path("/nonexistent/twin.sock").is_ok());
    }
}
