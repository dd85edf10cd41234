//! Announcing the VM at its new place on the network after failover: a gratuitous ARP
//! when the guest's IPv4 address is known, a RARP (what QEMU's self-announce sends)
//! otherwise. Either makes switches and bridges learn the MAC on the new port; the ARP also
//! refreshes neighbours' caches.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use twin_vmm::devices::tap::Tap;

/// When announcements go out after a takeover, from its start: three at once, then a few
/// more over the next second in case a switch on the way was not yet forwarding.
const SCHEDULE_MS: [u64; 6] = [0, 0, 0, 100, 300, 1000];

/// Sends `frame` out of `tap` on [`SCHEDULE_MS`]: the first ones now, the rest from a
/// short-lived thread so the takeover does not wait for them. That thread is detached on
/// purpose: it owns only the TAP and one frame, ends within a second, and nothing needs its
/// outcome (a failed send is logged; the guest announces itself too).
pub fn announce(tap: Arc<Tap>, frame: Vec<u8>, tap_name: &str) {
    let send = |tap: &Tap, name: &str| {
        if let Err(e) = tap.write_frame(&frame) {
            tracing::warn!("announcing the guest on {name} failed: {e}");
        }
    };
    for _ in SCHEDULE_MS.iter().take_while(|&&ms| ms == 0) {
        send(&tap, tap_name);
    }
    let name = tap_name.to_string();
    let later: Vec<u64> = SCHEDULE_MS.iter().copied().filter(|&ms| ms > 0).collect();
    let frame2 = frame.clone();
    let spawned = std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            let mut at = 0;
            for ms in later {
                std::thread::sleep(Duration::from_millis(ms - at));
                at = ms;
                if let Err(e) = tap.write_frame(&frame2) {
                    tracing::warn!("announcing the guest on {name} failed: {e}");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot schedule repeated announcements: {e}");
    }
}

/// A broadcast gratuitous ARP request from `mac` for `ip` (sender IP = target IP).
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&1u16.to_be_bytes()); // request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f.resize(60, 0);
    f
}

/// A broadcast RARP request from `mac` (no IP needed).
pub fn rarp(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes());
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&3u16.to_be_bytes()); // reverse request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_layout() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = gratuitous_arp(mac, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[10, 0, 0, 2]);
        assert_eq!(&f[38..42], &[10, 0, 0, 2]);
        let r = rarp(mac);
        assert_eq!(&r[12..14], &[0x80, 0x35]);
        assert_eq!(&r[20..22], &[0, 3]);
    }
}
