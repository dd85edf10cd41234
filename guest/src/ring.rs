//! Pure decisions about virtqueue indices (no MMIO), so the host can test them.

/// Whether the driver must notify the device after reposting `reposted` RX buffers, with the
/// avail index now at `avail_idx` and the device's used index read as `used_idx` (after the
/// reposts were published).
///
/// The device waits for a notification only once it has used every buffer it was given. It
/// still holds `avail_idx - used_idx` buffers, ours included; if it has already used some of
/// the ones we just reposted (it runs on another CPU), the older ones are all gone and it may
/// be about to wait, so that must count as none left, never wrap around to "plenty". Kicking
/// only when fewer than a quarter of the ring's older buffers remain saves exits while the
/// device is busy.
pub fn rx_needs_kick(avail_idx: u16, used_idx: u16, reposted: u16, size: u16) -> bool {
    let held = avail_idx.wrapping_sub(used_idx);
    let older = held.saturating_sub(reposted);
    older < size / 4
}
