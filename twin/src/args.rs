//! Parsers for command-line values: sizes, IPv4 with prefix, MAC addresses.

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
    #[error("duration `{0}` is not a whole number followed by us, ms or s, like 25ms or 500us")]
    Duration(String),
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
        // Multicast MACs cannot be a NIC's address.
        if parts.next().is_some() || mac[0] & 1 != 0 {
            return Err(err());
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
        let ns = n
            .checked_mul(unit_ns)
            .filter(|&ns| ns > 0)
            .ok_or_else(err)?;
        Ok(Millis(std::time::Duration::from_nanos(ns)))
    }
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
    }
}
