//! systemd's readiness protocol (`sd_notify`): a datagram to `$NOTIFY_SOCKET` saying
//! `READY=1` once the service does what it is for (`Type=notify` units in
//! `contrib/systemd/`), and `STATUS=` lines for `systemctl status`. Without the variable
//! (not under systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Whether systemd listens.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Sends `msg` (newline-separated `KEY=value` assignments); a failure is logged, never
/// fatal: the service works without its manager's knowing.
fn send(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg.as_bytes(), &addr)
        } else {
            sock.send_to(msg.as_bytes(), &path)
        }
    });
    if let Err(e) = sent {
        tracing::warn!(socket = ?path, error = %e, "cannot notify systemd");
    }
}

/// The service is ready (`READY=1`), with a status line.
pub fn ready(status: &str) {
    send(&format!(
        "READY=1\nSTATUS={status}\nMAINPID={}",
        std::process::id()
    ));
}

/// A status line for `systemctl status`.
pub fn status(status: &str) {
    send(&format!("STATUS={status}"));
}
