//! A fault-injecting TCP proxy for the replication link.
//!
//! The primary connects to the proxy, the proxy to the backup; both sockets live in one
//! namespace (normally the primary host's, the proxy listening on its loopback). The proxy
//! parses the frames of `wire/PROTOCOL.md` in both directions — a fixed 24-byte header
//! (magic `TWIN`, type, flags, reserved, payload length, CRC-64/XZ of the payload, and a
//! header check: the low 32 bits of CRC-64/XZ of header bytes 0..20) then the payload — and
//! forwards them whole, one frame at a time, unless a [`Fault`] is armed. An armed fault fires
//! on the `nth` frame of its type in its direction counted from the moment it was armed
//! (across reconnections), or on every such frame; what it did is recorded as an
//! [`Injection`], with the epoch the frame names when its payload starts with one
//! (`EpochBegin`, `Pages`, `State`, `EpochEnd`, `Ack`).
//!
//! The proxy knows the frame layout independently of `twin-wire` (it is a second reading
//! of the specification): it computes CRCs itself when it rewrites a frame.
//!
//! A stream whose header does not parse (bad magic, header check) is forwarded byte for byte
//! from there on, so the proxy never hides a sender's own framing bug.
//!
//! The replication link is authenticated (and maybe encrypted): the proxy holds the key and
//! terminates the link on both sides (a backup to the primary, a primary to the backup), so
//! it sees and rewrites the frames as a man in the middle who has the key would. Each side's
//! link handshake is with the proxy; the frames are the primary's and the backup's own.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use twin_link::{LinkConfig, LinkReader, LinkWriter};

use crate::error::{HarnessError, Result};
use crate::netns::Netns;

/// Size of a frame header.
pub const FRAME_HEADER_LEN: usize = 24;
/// The magic every frame starts with.
pub const FRAME_MAGIC: [u8; 4] = *b"TWIN";
/// Largest payload the proxy accepts as a frame (the protocol's default receiver cap).
pub const MAX_PAYLOAD: u32 = 64 << 20;

/// Frame types of the protocol (`wire/PROTOCOL.md` §4).
pub mod frame_type {
    pub const HELLO: u8 = 1;
    pub const HELLO_ACK: u8 = 2;
    pub const REFUSE: u8 = 3;
    pub const VM_DESCRIPTION: u8 = 4;
    pub const SYNC_PAGES: u8 = 5;
    pub const SYNC_ZERO_PAGES: u8 = 6;
    pub const SYNC_DONE: u8 = 7;
    pub const EPOCH_BEGIN: u8 = 8;
    pub const PAGES: u8 = 9;
    pub const STATE: u8 = 10;
    pub const EPOCH_END: u8 = 11;
    pub const ACK: u8 = 12;
    pub const HEARTBEAT: u8 = 13;
    pub const GOODBYE: u8 = 14;
    pub const DISK_WRITES: u8 = 15;
    pub const SYNC_DISK: u8 = 16;
    pub const INBOUND: u8 = 17;
    /// The epoch pages with `--compress lz4|delta` (the default).
    pub const COMPRESSED_PAGES: u8 = 18;

    /// A name for messages and reports.
    pub fn name(t: u8) -> &'static str {
        match t {
            HELLO => "Hello",
            HELLO_ACK => "HelloAck",
            REFUSE => "Refuse",
            VM_DESCRIPTION => "VmDescription",
            SYNC_PAGES => "SyncPages",
            SYNC_ZERO_PAGES => "SyncZeroPages",
            SYNC_DONE => "SyncDone",
            EPOCH_BEGIN => "EpochBegin",
            PAGES => "Pages",
            STATE => "State",
            EPOCH_END => "EpochEnd",
            ACK => "Ack",
            HEARTBEAT => "Heartbeat",
            GOODBYE => "Goodbye",
            DISK_WRITES => "DiskWrites",
            SYNC_DISK => "SyncDisk",
            INBOUND => "Inbound",
            COMPRESSED_PAGES => "CompressedPages",
            _ => "unknown",
        }
    }
}

/// CRC-64/XZ, as the protocol uses for payloads and (truncated) headers.
pub fn crc64_xz(data: &[u8]) -> u64 {
    let mut d = crc64fast::Digest::new();
    d.write(data);
    d.sum64()
}

/// A frame as read off the wire: its header bytes and payload, unmodified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The 24 header bytes.
    pub header: [u8; FRAME_HEADER_LEN],
    /// The payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A well-formed frame of type `ty` around `payload` (CRCs computed).
    pub fn new(ty: u8, payload: Vec<u8>) -> Self {
        let mut f = Frame {
            header: [0; FRAME_HEADER_LEN],
            payload,
        };
        f.header[..4].copy_from_slice(&FRAME_MAGIC);
        f.header[4] = ty;
        f.reseal();
        f
    }

    /// The frame type byte.
    pub fn frame_type(&self) -> u8 {
        self.header[4]
    }

    /// The payload CRC the header carries.
    pub fn header_crc(&self) -> u64 {
        u64::from_le_bytes(self.header[12..20].try_into().expect("8 bytes"))
    }

    /// Whether the payload CRC and the header check both match.
    pub fn is_sealed(&self) -> bool {
        self.header_crc() == crc64_xz(&self.payload)
            && self.header[20..24] == header_check(&self.header).to_le_bytes()
            && self.header[8..12] == (self.payload.len() as u32).to_le_bytes()
    }

    /// Recomputes length, payload CRC and header check after the payload changed.
    pub fn reseal(&mut self) {
        let len = u32::try_from(self.payload.len()).expect("payload fits a u32");
        self.header[8..12].copy_from_slice(&len.to_le_bytes());
        let crc = crc64_xz(&self.payload);
        self.header[12..20].copy_from_slice(&crc.to_le_bytes());
        let check = header_check(&self.header);
        self.header[20..24].copy_from_slice(&check.to_le_bytes());
    }

    /// The epoch a frame names when its payload starts with one (`EpochBegin`, `Pages`,
    /// `State`, `EpochEnd`, `Ack`: a little-endian u64 first in each layout).
    pub fn epoch(&self) -> Option<u64> {
        use frame_type::*;
        match self.frame_type() {
            EPOCH_BEGIN | PAGES | COMPRESSED_PAGES | DISK_WRITES | STATE | EPOCH_END | ACK
                if self.payload.len() >= 8 =>
            {
                Some(u64::from_le_bytes(
                    self.payload[..8].try_into().expect("8 bytes"),
                ))
            }
            _ => None,
        }
    }

    /// Header then payload, as sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(FRAME_HEADER_LEN + self.payload.len());
        v.extend_from_slice(&self.header);
        v.extend_from_slice(&self.payload);
        v
    }
}

/// Low 32 bits of CRC-64/XZ of header bytes 0..20.
fn header_check(header: &[u8; FRAME_HEADER_LEN]) -> u32 {
    crc64_xz(&header[..20]) as u32
}

/// Whether a header parses: magic, header check, flags and reserved zero, length within the
/// cap. Returns the payload length.
pub fn parse_header(header: &[u8; FRAME_HEADER_LEN]) -> Option<u32> {
    if header[..4] != FRAME_MAGIC
        || header[20..24] != header_check(header).to_le_bytes()
        || header[5..8] != [0, 0, 0]
    {
        return None;
    }
    let len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    (len <= MAX_PAYLOAD).then_some(len)
}

/// A direction through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Way {
    /// Primary → backup (checkpoints, heartbeats, Hello).
    ToBackup,
    /// Backup → primary (HelloAck, Ack, heartbeats, Refuse).
    ToPrimary,
}

/// What a fault does to the frame it fires on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Flips one bit in the last payload byte (for `Pages`, page data) and leaves the frame
    /// CRC as it was: the receiver's frame CRC check must catch it.
    FlipBit,
    /// Flips the same bit and recomputes the frame CRC and header check: only the epoch's
    /// end-to-end checksum can catch it.
    FlipBitForged,
    /// Sends the header and half the payload, then closes both connections of the session.
    Truncate,
    /// Holds the frame back and sends it after the next frame in the same direction.
    SwapWithNext,
    /// Sends the frame twice.
    Duplicate,
    /// For `Hello`: rewrites `protocol_version` (the payload's first four bytes) and reseals.
    SetHelloVersion(u32),
    /// Drops the frame (the stream stays in sync: the receiver never sees it).
    Drop,
}

/// A fault to inject: on the `nth` (1-based) frame of type `frame_type` travelling `way`,
/// counted from when it is armed; `nth: None` fires on every such frame while armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub way: Way,
    pub frame_type: u8,
    pub nth: Option<u64>,
}

/// What the proxy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    pub kind: FaultKind,
    pub way: Way,
    pub frame_type: u8,
    /// The epoch the frame named, if its payload starts with one.
    pub epoch: Option<u64>,
    /// Which accepted connection (1-based) it happened on.
    pub connection: u64,
    /// When.
    pub at: Instant,
}

#[derive(Debug, Default)]
struct State {
    armed: Option<(Fault, u64)>,
    injections: Vec<Injection>,
    connections: u64,
    /// Frames forwarded per (way, type), over the proxy's life.
    frames: std::collections::HashMap<(Way, u8), u64>,
    /// Highest epoch seen per way (the last `EpochEnd` to the backup, the last `Ack` back).
    last_epoch_end: Option<u64>,
    last_ack: Option<u64>,
    unframed: Vec<String>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running proxy; stops (closing every session) on drop.
#[derive(Debug)]
pub struct FrameProxy {
    shared: Arc<Shared>,
    listen: SocketAddr,
    ns: Netns,
    acceptor: Option<JoinHandle<()>>,
    sessions: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
}

/// How long the proxy tries to reach the backup for each accepted connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long each link handshake of the proxy may take.
const LINK_TIMEOUT: Duration = Duration::from_secs(5);

impl FrameProxy {
    /// Listens on `listen` inside `ns`; every connection accepted there is relayed to
    /// `upstream`, connected from inside `ns` too; both links use `link` (the pair's key).
    pub fn start(
        ns: &Netns,
        listen: SocketAddr,
        upstream: SocketAddr,
        link: LinkConfig,
    ) -> Result<Self> {
        let listener = ns.enter(|| TcpListener::bind(listen))?.map_err(|e| {
            HarnessError::io(format!("proxy: binding {listen} in {}", ns.name()), e)
        })?;
        let listen = listener
            .local_addr()
            .map_err(|e| HarnessError::io("proxy: local address", e))?;
        let shared = Arc::new(Shared::default());
        let sessions: Arc<Mutex<Vec<(TcpStream, TcpStream)>>> = Arc::default();
        let (sh, ns2, sess) = (shared.clone(), ns.clone(), sessions.clone());
        let acceptor = std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(listener, upstream, &link, &ns2, &sh, &sess))
            .map_err(|e| HarnessError::io("proxy: spawning the acceptor", e))?;
        Ok(FrameProxy {
            shared,
            listen,
            ns: ns.clone(),
            acceptor: Some(acceptor),
            sessions,
        })
    }

    /// Where the primary must connect (`--backup` of `twin protect`).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Arms `fault` (replacing any armed one); counting starts now.
    pub fn arm(&self, fault: Fault) {
        self.shared.lock().armed = Some((fault, 0));
    }

    /// Disarms the fault, if any.
    pub fn disarm(&self) {
        self.shared.lock().armed = None;
    }

    /// Everything injected so far.
    pub fn injections(&self) -> Vec<Injection> {
        self.shared.lock().injections.clone()
    }

    /// Waits until at least `n` injections happened; returns them.
    pub fn wait_injections(&self, n: usize, timeout: Duration) -> Result<Vec<Injection>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if st.injections.len() >= n {
                return Ok(st.injections.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HarnessError::Timeout {
                    what: format!(
                        "the proxy to inject {:?} ({} injected, frames seen {:?})",
                        st.armed,
                        st.injections.len(),
                        st.frames
                    ),
                    after: timeout,
                });
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.lock().connections
    }

    /// Frames of type `ty` forwarded `way` so far.
    pub fn frames(&self, way: Way, ty: u8) -> u64 {
        self.shared
            .lock()
            .frames
            .get(&(way, ty))
            .copied()
            .unwrap_or(0)
    }

    /// The last epoch whose `EpochEnd` went to the backup, and the last `Ack` epoch back.
    pub fn last_epochs(&self) -> (Option<u64>, Option<u64>) {
        let st = self.shared.lock();
        (st.last_epoch_end, st.last_ack)
    }

    /// Streams the proxy had to forward unframed (a header that did not parse), if any.
    pub fn unframed(&self) -> Vec<String> {
        self.shared.lock().unframed.clone()
    }
}

impl Drop for FrameProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for (a, b) in self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        // Wake the blocked accept.
        let addr = self.listen;
        let _ = self
            .ns
            .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    link: &LinkConfig,
    ns: &Netns,
    shared: &Arc<Shared>,
    sessions: &Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(down) = conn else { continue };
        let down_sock = down.try_clone();
        let down = match twin_link::accept(down, link, LINK_TIMEOUT) {
            Ok(l) => l,
            Err(e) => {
                shared
                    .lock()
                    .unframed
                    .push(format!("link handshake with the primary failed: {e}"));
                continue;
            }
        };
        let up = match ns.enter(|| TcpStream::connect_timeout(&upstream, UPSTREAM_CONNECT_TIMEOUT))
        {
            Ok(Ok(s)) => s,
            // The backup is not there: the primary sees its connection closed at once.
            _ => {
                down.writer.shutdown(Shutdown::Both);
                continue;
            }
        };
        let up_sock = up.try_clone();
        let up = match twin_link::connect(up, link, LINK_TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                down.writer.shutdown(Shutdown::Both);
                continue;
            }
        };
        let id = {
            let mut st = shared.lock();
            st.connections += 1;
            st.connections
        };
        // Socket handles to shut both connections from either pump, and from `Drop`.
        let handles = (|| {
            let (d, u) = (down_sock.ok()?, up_sock.ok()?);
            let pair = || Some([d.try_clone().ok()?, u.try_clone().ok()?]);
            Some((pair()?, pair()?, [d, u]))
        })();
        let Some((ends, ends2, [d, u])) = handles else {
            continue;
        };
        sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((d, u));
        let sh = shared.clone();
        let (down_r, down_w, up_r, up_w) = (down.reader, down.writer, up.reader, up.writer);
        let _ = std::thread::Builder::new()
            .name(format!("proxy-{id}-to-backup"))
            .spawn(move || pump(down_r, up_w, &ends, Way::ToBackup, id, &sh));
        let sh = shared.clone();
        let _ = std::thread::Builder::new()
            .name(format!("proxy-{id}-to-primary"))
            .spawn(move || pump(up_r, down_w, &ends2, Way::ToPrimary, id, &sh));
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of stream before the first.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Relays `from` → `to` frame by frame, applying the armed fault; closes both connections
/// (`ends`) on any end.
fn pump(
    mut from: LinkReader,
    mut to: LinkWriter,
    ends: &[TcpStream; 2],
    way: Way,
    conn: u64,
    shared: &Shared,
) {
    let mut held: Option<Frame> = None;
    let end = |_: &LinkReader, _: &LinkWriter| {
        for s in ends {
            let _ = s.shutdown(Shutdown::Both);
        }
    };
    loop {
        let mut header = [0u8; FRAME_HEADER_LEN];
        match read_full(&mut from, &mut header) {
            Ok(true) => {}
            Ok(false) | Err(_) => return end(&from, &to),
        }
        let Some(len) = parse_header(&header) else {
            shared.lock().unframed.push(format!(
                "connection {conn} {way:?}: header {header:02x?} does not parse; forwarding raw"
            ));
            if to.write_all(&header).is_err() {
                return end(&from, &to);
            }
            let _ = std::io::copy(&mut from, &mut to);
            return end(&from, &to);
        };
        let mut payload = vec![0u8; len as usize];
        if len > 0 {
            match read_full(&mut from, &mut payload) {
                Ok(true) => {}
                _ => return end(&from, &to),
            }
        }
        let mut frame = Frame { header, payload };
        let ty = frame.frame_type();
        // Decide, under the lock, whether the armed fault fires on this frame.
        let fire = {
            let mut st = shared.lock();
            *st.frames.entry((way, ty)).or_default() += 1;
            match (way, ty) {
                (Way::ToBackup, frame_type::EPOCH_END) => st.last_epoch_end = frame.epoch(),
                (Way::ToPrimary, frame_type::ACK) => st.last_ack = frame.epoch(),
                _ => {}
            }
            let mut fire = None;
            if let Some((fault, seen)) = st.armed.as_mut() {
                if fault.way == way && fault.frame_type == ty {
                    *seen += 1;
                    if fault.nth.is_none_or(|n| n == *seen) {
                        fire = Some(fault.kind);
                    }
                    if fault.nth.is_some_and(|n| *seen >= n) {
                        st.armed = None;
                    }
                }
            }
            if let Some(kind) = fire {
                st.injections.push(Injection {
                    kind,
                    way,
                    frame_type: ty,
                    epoch: frame.epoch(),
                    connection: conn,
                    at: Instant::now(),
                });
                shared.changed.notify_all();
            }
            fire
        };
        let mut out: Vec<Frame> = Vec::with_capacity(2);
        match fire {
            None => out.push(frame),
            Some(FaultKind::FlipBit) | Some(FaultKind::FlipBitForged) => {
                if let Some(last) = frame.payload.last_mut() {
                    *last ^= 0x10;
                } else {
                    // No payload to corrupt: corrupt the payload CRC instead.
                    frame.header[12] ^= 0x10;
                    let check = header_check(&frame.header);
                    frame.header[20..24].copy_from_slice(&check.to_le_bytes());
                }
                if fire == Some(FaultKind::FlipBitForged) {
                    frame.reseal();
                }
                out.push(frame);
            }
            Some(FaultKind::Truncate) => {
                let bytes = frame.to_bytes();
                let cut = FRAME_HEADER_LEN + frame.payload.len() / 2;
                let _ = to.write_all(&bytes[..cut]);
                let _ = to.flush();
                return end(&from, &to);
            }
            Some(FaultKind::SwapWithNext) => {
                held = Some(frame);
                continue;
            }
            Some(FaultKind::Duplicate) => {
                out.push(frame.clone());
                out.push(frame);
            }
            Some(FaultKind::SetHelloVersion(v)) => {
                if frame.payload.len() >= 4 {
                    frame.payload[..4].copy_from_slice(&v.to_le_bytes());
                    frame.reseal();
                }
                out.push(frame);
            }
            Some(FaultKind::Drop) => {}
        }
        if let Some(h) = held.take() {
            out.push(h);
        }
        for f in out {
            if to.write_all(&f.to_bytes()).is_err() {
                return end(&from, &to);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_xz_check_value() {
        // The catalogue check value of CRC-64/XZ.
        assert_eq!(crc64_xz(b"123456789"), 0x995d_c9bb_df19_39fa);
    }

    #[test]
    fn frames_seal_and_parse() {
        let mut f = Frame::new(frame_type::ACK, 7u64.to_le_bytes().to_vec());
        assert!(f.is_sealed());
        assert_eq!(parse_header(&f.header), Some(8));
        assert_eq!(f.epoch(), Some(7));
        f.payload[0] ^= 1;
        assert!(!f.is_sealed(), "a flipped payload bit must break the CRC");
        assert_eq!(
            parse_header(&f.header),
            Some(8),
            "the header itself is intact"
        );
        f.reseal();
        assert!(f.is_sealed());
        let mut h = f.header;
        h[9] ^= 1;
        assert_eq!(
            parse_header(&h),
            None,
            "a corrupted length fails the header check"
        );
        let mut h = f.header;
        h[0] = b'X';
        assert_eq!(parse_header(&h), None);
    }
}
