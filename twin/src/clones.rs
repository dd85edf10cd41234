//! `twin clone`: the identity of each of N clones of one snapshot (TAP, MAC, IPv4 address,
//! control socket, console file), derived from a base for each, as a pure plan.
//!
//! Clone `i` (from 0) gets TAP `PREFIX{i}`, MAC `base + i` (counted in the low three
//! bytes, the NIC-specific part: the vendor prefix never changes), address `base + i` in
//! the base's subnet (never its network or broadcast address), and
//! `DIR/clone-{i}.sock` / `DIR/clone-{i}.console`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::args::{Cidr, Mac};

/// Most clones one `twin clone` starts.
pub const MAX_CLONES: u32 = 1024;

/// Why a plan of clones cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CloneError {
    #[error("--count must be between 1 and {MAX_CLONES}, not {0}")]
    Count(u32),
    #[error("the TAP name {0:?} is longer than 15 characters (use a shorter --tap-prefix)")]
    TapName(String),
    #[error("MAC {base} + {index} runs past the NIC part of the address (the low three bytes)")]
    MacOverflow { base: String, index: u32 },
    #[error("address {base}/{prefix} + {index} is outside its /{prefix} subnet (or its broadcast address)")]
    IpOverflow {
        base: Ipv4Addr,
        prefix: u8,
        index: u32,
    },
    #[error("--ip-base {0} is the network address of its subnet; give the first clone's address")]
    NetworkAddress(Ipv4Addr),
}

/// What one clone is started with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClonePlan {
    pub index: u32,
    pub tap: String,
    pub mac: Mac,
    pub ip: Cidr,
    pub control: PathBuf,
    pub console: PathBuf,
}

/// MAC `base + i` in its low three bytes.
pub fn mac_add(base: Mac, i: u32) -> Result<Mac, CloneError> {
    let b = base.0;
    let low = u32::from_be_bytes([0, b[3], b[4], b[5]]);
    let err = || CloneError::MacOverflow {
        base: base.to_string(),
        index: i,
    };
    let n = low
        .checked_add(i)
        .filter(|&n| n < 1 << 24)
        .ok_or_else(err)?;
    let [_, x, y, z] = n.to_be_bytes();
    Ok(Mac([b[0], b[1], b[2], x, y, z]))
}

/// Address `base + i`, inside `base`'s subnet and below its broadcast address (a /31 or
/// /32 has neither network nor broadcast address).
pub fn ip_add(base: Cidr, i: u32) -> Result<Cidr, CloneError> {
    let err = || CloneError::IpOverflow {
        base: base.addr,
        prefix: base.prefix_len,
        index: i,
    };
    let b = u32::from(base.addr);
    let host_bits = 32 - u32::from(base.prefix_len.min(32));
    let mask = if host_bits == 32 {
        0
    } else {
        u32::MAX << host_bits
    };
    let network = b & mask;
    if host_bits >= 2 && b == network {
        return Err(CloneError::NetworkAddress(base.addr));
    }
    let n = b.checked_add(i).ok_or_else(err)?;
    // The last host: the broadcast address minus one, or the top of a /31 or /32.
    let last = if host_bits >= 2 {
        (network | !mask) - 1
    } else {
        network | !mask
    };
    if n & mask != network || n > last {
        return Err(err());
    }
    Ok(Cidr {
        addr: Ipv4Addr::from(n),
        prefix_len: base.prefix_len,
    })
}

/// The plan for `count` clones.
pub fn plan(
    count: u32,
    tap_prefix: &str,
    mac_base: Mac,
    ip_base: Cidr,
    dir: &Path,
) -> Result<Vec<ClonePlan>, CloneError> {
    if count == 0 || count > MAX_CLONES {
        return Err(CloneError::Count(count));
    }
    (0..count)
        .map(|i| {
            let tap = format!("{tap_prefix}{i}");
            if tap.len() >= 16 {
                return Err(CloneError::TapName(tap));
            }
            Ok(ClonePlan {
                index: i,
                tap,
                mac: mac_add(mac_base, i)?,
                ip: ip_add(ip_base, i)?,
                control: dir.join(format!("clone-{i}.sock")),
                console: dir.join(format!("clone-{i}.console")),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn macs_count_in_the_nic_part_only() {
        let base: Mac = "52:54:00:00:10:fe".parse().unwrap();
        assert_eq!(mac_add(base, 0).unwrap(), base);
        assert_eq!(
            mac_add(base, 3).unwrap().to_string(),
            "52:54:00:00:11:01",
            "carries into the next byte"
        );
        let top: Mac = "52:54:00:ff:ff:fe".parse().unwrap();
        assert!(mac_add(top, 1).is_ok());
        assert!(matches!(
            mac_add(top, 2),
            Err(CloneError::MacOverflow { index: 2, .. })
        ));
    }

    #[test]
    fn addresses_stay_inside_the_subnet() {
        let base = cidr("10.0.0.10/24");
        assert_eq!(ip_add(base, 5).unwrap(), cidr("10.0.0.15/24"));
        assert_eq!(ip_add(base, 244).unwrap(), cidr("10.0.0.254/24"));
        assert!(ip_add(base, 245).is_err(), "the broadcast address");
        assert!(ip_add(base, 246).is_err(), "past the subnet");
        assert_eq!(
            ip_add(cidr("10.0.0.0/24"), 0),
            Err(CloneError::NetworkAddress(Ipv4Addr::new(10, 0, 0, 0)))
        );
        assert_eq!(
            ip_add(cidr("10.0.0.250/16"), 10).unwrap(),
            cidr("10.0.1.4/16")
        );
        assert!(ip_add(cidr("255.255.255.250/32"), 0).is_ok());
        assert!(ip_add(cidr("255.255.255.250/32"), 1).is_err());
        assert!(
            ip_add(cidr("255.255.255.254/1"), 1).is_err(),
            "never past 2^32"
        );
    }

    #[test]
    fn a_plan_names_every_resource_of_every_clone() {
        let p = plan(
            3,
            "tap-c",
            "52:54:00:00:10:00".parse().unwrap(),
            cidr("10.0.0.10/24"),
            Path::new("/run/twin/clones"),
        )
        .unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[2].tap, "tap-c2");
        assert_eq!(p[2].mac.to_string(), "52:54:00:00:10:02");
        assert_eq!(p[2].ip, cidr("10.0.0.12/24"));
        assert_eq!(p[2].control, Path::new("/run/twin/clones/clone-2.sock"));
        assert_eq!(p[2].console, Path::new("/run/twin/clones/clone-2.console"));
        let base = "52:54:00:00:10:00".parse().unwrap();
        assert_eq!(
            plan(0, "t", base, cidr("10.0.0.10/24"), Path::new("/")),
            Err(CloneError::Count(0))
        );
        assert!(matches!(
            plan(11, "a-long-prefix1", base, cidr("10.0.0.10/24"), Path::new("/")),
            Err(CloneError::TapName(t)) if t == "a-long-prefix110"
        ));
        assert!(plan(300, "t", base, cidr("10.0.0.10/24"), Path::new("/")).is_err());
    }
}
