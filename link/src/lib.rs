//! The replication link: one TCP connection between a primary and its backup, authenticated
//! with a pre-shared key and optionally encrypted, carrying `twin-wire` frames.
//!
//! Layers, bottom up:
//! - [`connect`] / [`accept`]: a 16-byte preamble each way (what each side requires: a key,
//!   encryption), then, with a key, a Noise `NNpsk0` handshake (`snow`, X25519, AES-GCM,
//!   SHA-256) and a key confirmation from the initiator. Both sides prove they hold the key;
//!   a replayed handshake is refused (the replayer cannot confirm); each side names the
//!   cause of a failure (no key, wrong key, not a Twin peer). See `wire/PROTOCOL.md` §1.
//! - [`LinkReader`] / [`LinkWriter`]: the byte stream after the handshake: plaintext, or
//!   AEAD records of at most 64 KiB when encrypted (either side asking is enough).
//! - [`FrameReader`] / [`FrameWriter`]: `twin-wire` messages over the stream, with timed
//!   reads, whole-frame writes under one lock (the session thread, the heartbeat thread and
//!   the ack reader share a writer) and a best-effort goodbye.
//! - [`Heartbeats`]: the thread that keeps a quiet link alive and watches its own running.
//!
//! Blocking sockets on dedicated threads, as the rest of the data path: the epoch loop is a
//! sequence of blocking KVM ioctls whose latency is the product.

mod frames;
mod heartbeat;
mod key;
pub mod realtime;
mod stream;

pub use frames::{FrameReader, FrameWriter, RecvError, SendError};
pub use heartbeat::{monotonic_ns, Heartbeats};
pub use key::{Key, KeyError, KEY_LEN};
pub use stream::{LinkReader, LinkWriter, ReadOutcome};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Noise protocol of an authenticated link: the PSK is mixed in before the first message, so
/// both messages prove the key; ephemeral X25519 gives each session fresh keys.
const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";

const MAGIC: &[u8; 8] = b"TWINLINK";
/// Version of the link layer (preamble, handshake, records). A change bumps it.
pub const LINK_VERSION: u16 = 1;
const PREAMBLE_LEN: usize = 16;
/// Payload of the initiator's key confirmation, the first transport message.
const CONFIRM: &[u8; 8] = b"TWINCONF";
/// Largest Noise message (and so record), tag included.
const MAX_RECORD: usize = 65535;
/// AEAD tag per record.
const TAG_LEN: usize = 16;
/// Plaintext bytes per record.
pub(crate) const RECORD_PAYLOAD: usize = MAX_RECORD - TAG_LEN;

/// A heartbeat goes out when a side sent nothing else for this long (both sides, `twin`).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(20);

/// What this end of a link requires.
#[derive(Clone, Debug, Default)]
pub struct LinkConfig {
    /// The pre-shared key; `None` runs the link unauthenticated (anyone who reaches the port
    /// can be a primary or a backup), and is refused by a peer that has a key.
    pub key: Option<Key>,
    /// Encrypt the stream after the handshake (needs a key). Either side asking is enough.
    pub encrypt: bool,
}

impl LinkConfig {
    /// An unauthenticated link.
    pub fn insecure() -> Self {
        LinkConfig::default()
    }

    /// A link authenticated with `key`.
    pub fn with_key(key: Key, encrypt: bool) -> Self {
        LinkConfig {
            key: Some(key),
            encrypt,
        }
    }

    fn mode(&self) -> u8 {
        u8::from(self.key.is_some())
    }
}

/// What the handshake established.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// Both sides proved they hold the same key.
    pub authenticated: bool,
    /// Records after the handshake are encrypted and authenticated.
    pub encrypted: bool,
}

/// A link after its handshake: the two halves of the stream.
pub struct Link {
    pub reader: LinkReader,
    pub writer: LinkWriter,
    pub peer: SocketAddr,
    pub info: LinkInfo,
}

/// Why a link could not be set up or broke.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link to {peer} failed")]
    Io {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{peer} did not complete the link handshake within {0:?}", .timeout)]
    Timeout { peer: SocketAddr, timeout: Duration },
    #[error("{peer} is not a Twin replication peer (it sent no link preamble)")]
    NotTwin { peer: SocketAddr },
    #[error("{peer} speaks link version {theirs}, this side {LINK_VERSION}")]
    Version { peer: SocketAddr, theirs: u16 },
    #[error(
        "{peer} requires an authenticated link and this side has no key: give both sides the \
         same --key-file"
    )]
    PeerRequiresKey { peer: SocketAddr },
    #[error(
        "{peer} has no key and this side requires an authenticated link: give both sides the \
         same --key-file (or run both with --no-auth)"
    )]
    PeerHasNoKey { peer: SocketAddr },
    #[error("{peer} failed authentication: its key differs from this side's (or it is not the Twin peer it claims to be)")]
    WrongKey { peer: SocketAddr },
    #[error("{peer} did not confirm the session key (a replayed handshake?)")]
    NoConfirmation { peer: SocketAddr },
    #[error("--encrypt needs a key (--key-file)")]
    EncryptWithoutKey,
    #[error("a record from {peer} failed authentication: the stream was altered on the way")]
    Tampered { peer: SocketAddr },
    #[error("{peer} sent a malformed record ({len} bytes)")]
    BadRecord { peer: SocketAddr, len: usize },
    #[error("the Noise handshake failed: {0}")]
    Noise(String),
}

impl LinkError {
    /// Whether retrying soon can help: a wrong or missing key, another link version or a
    /// peer that is not Twin will not change in a second.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            LinkError::Version { .. }
                | LinkError::PeerRequiresKey { .. }
                | LinkError::PeerHasNoKey { .. }
                | LinkError::WrongKey { .. }
                | LinkError::NotTwin { .. }
                | LinkError::EncryptWithoutKey
        )
    }
}

/// The responder's verdict on a preamble.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Verdict {
    Proceed = 0,
    Version = 1,
    KeyRequired = 2,
    NoKeyHere = 3,
}

fn preamble(cfg: &LinkConfig, status: u8) -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..8].copy_from_slice(MAGIC);
    p[8..10].copy_from_slice(&LINK_VERSION.to_le_bytes());
    p[10] = cfg.mode();
    p[11] = u8::from(cfg.encrypt);
    p[12] = status;
    p
}

struct Parsed {
    version: u16,
    mode: u8,
    encrypt: bool,
    status: u8,
}

fn parse(p: &[u8; PREAMBLE_LEN]) -> Option<Parsed> {
    (&p[..8] == MAGIC).then(|| Parsed {
        version: u16::from_le_bytes([p[8], p[9]]),
        mode: p[10],
        encrypt: p[11] & 1 != 0,
        status: p[12],
    })
}

/// Bounded blocking I/O during a handshake: every read and write must finish by `deadline`.
struct Timed<'a> {
    stream: &'a TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    timeout: Duration,
}

impl Timed<'_> {
    fn arm(&self) -> Result<(), LinkError> {
        let left = self
            .deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(LinkError::Timeout {
                peer: self.peer,
                timeout: self.timeout,
            })?;
        self.stream
            .set_read_timeout(Some(left))
            .and_then(|()| self.stream.set_write_timeout(Some(left)))
            .map_err(|source| LinkError::Io {
                peer: self.peer,
                source,
            })
    }

    fn map(&self, e: std::io::Error) -> LinkError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => LinkError::Timeout {
                peer: self.peer,
                timeout: self.timeout,
            },
            _ => LinkError::Io {
                peer: self.peer,
                source: e,
            },
        }
    }

    fn read_exact(&self, buf: &mut [u8]) -> Result<(), LinkError> {
        let mut got = 0;
        while got < buf.len() {
            self.arm()?;
            match (&*self.stream).read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(LinkError::Io {
                        peer: self.peer,
                        source: std::io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.map(e)),
            }
        }
        Ok(())
    }

    fn write_all(&self, buf: &[u8]) -> Result<(), LinkError> {
        self.arm()?;
        (&*self.stream).write_all(buf).map_err(|e| self.map(e))
    }

    /// A handshake message: u16 length (LE), then the message. Length 0 is the responder's
    /// "authentication failed".
    fn read_message(&self) -> Result<Option<Vec<u8>>, LinkError> {
        let mut len = [0u8; 2];
        self.read_exact(&mut len)?;
        let len = usize::from(u16::from_le_bytes(len));
        if len == 0 {
            return Ok(None);
        }
        let mut msg = vec![0u8; len];
        self.read_exact(&mut msg)?;
        Ok(Some(msg))
    }

    fn write_message(&self, msg: &[u8]) -> Result<(), LinkError> {
        let mut out = Vec::with_capacity(2 + msg.len());
        out.extend_from_slice(&(msg.len() as u16).to_le_bytes());
        out.extend_from_slice(msg);
        self.write_all(&out)
    }
}

fn noise(e: snow::Error) -> LinkError {
    LinkError::Noise(e.to_string())
}

fn builder<'a>(key: &'a Key, prologue: &'a [u8]) -> Result<snow::Builder<'a>, LinkError> {
    let params = NOISE_PARAMS.parse().map_err(noise)?;
    snow::Builder::new(params)
        .psk(0, key.bytes())
        .map_err(noise)?
        .prologue(prologue)
        .map_err(noise)
}

/// Sets up the initiator's end (the primary) on a connected `stream`; the whole handshake
/// finishes within `timeout`.
pub fn connect(stream: TcpStream, cfg: &LinkConfig, timeout: Duration) -> Result<Link, LinkError> {
    if cfg.encrypt && cfg.key.is_none() {
        return Err(LinkError::EncryptWithoutKey);
    }
    let peer = peer_of(&stream)?;
    let io = Timed {
        stream: &stream,
        peer,
        deadline: Instant::now() + timeout,
        timeout,
    };
    let mine = preamble(cfg, 0);
    io.write_all(&mine)?;
    // A peer that closes without answering may be a busy backup shedding connections: an
    // I/O error, to retry soon; only an answer that is not a preamble says "not Twin".
    let mut theirs = [0u8; PREAMBLE_LEN];
    io.read_exact(&mut theirs)?;
    let verdict = parse(&theirs).ok_or(LinkError::NotTwin { peer })?;
    if verdict.version != LINK_VERSION {
        return Err(LinkError::Version {
            peer,
            theirs: verdict.version,
        });
    }
    match verdict.status {
        s if s == Verdict::Proceed as u8 => {}
        s if s == Verdict::KeyRequired as u8 => return Err(LinkError::PeerRequiresKey { peer }),
        s if s == Verdict::NoKeyHere as u8 => return Err(LinkError::PeerHasNoKey { peer }),
        _ => {
            return Err(LinkError::Version {
                peer,
                theirs: verdict.version,
            })
        }
    }
    let encrypted = cfg.encrypt || verdict.encrypt;
    let Some(key) = &cfg.key else {
        if verdict.mode != 0 {
            return Err(LinkError::PeerRequiresKey { peer });
        }
        return finish(stream, peer, None, false);
    };
    if verdict.mode == 0 {
        return Err(LinkError::PeerHasNoKey { peer });
    }
    let mut prologue = mine.to_vec();
    prologue.extend_from_slice(&theirs);
    let mut hs = builder(key, &prologue)?.build_initiator().map_err(noise)?;
    let mut buf = vec![0u8; MAX_RECORD];
    let n = hs.write_message(&[], &mut buf).map_err(noise)?;
    io.write_message(&buf[..n])?;
    let Some(msg2) = io.read_message()? else {
        // The responder could not open our first message: its key differs.
        return Err(LinkError::WrongKey { peer });
    };
    let mut payload = vec![0u8; MAX_RECORD];
    hs.read_message(&msg2, &mut payload)
        .map_err(|_| LinkError::WrongKey { peer })?;
    let transport = hs.into_stateless_transport_mode().map_err(noise)?;
    let n = transport
        .write_message(0, CONFIRM, &mut buf)
        .map_err(noise)?;
    io.write_message(&buf[..n])?;
    let link = finish(stream, peer, Some((Arc::new(transport), 1, 0)), encrypted)?;
    Ok(link)
}

/// Sets up the responder's end (the backup) on an accepted `stream`; the whole handshake
/// finishes within `timeout`. A refused peer is told why before the error is returned.
pub fn accept(stream: TcpStream, cfg: &LinkConfig, timeout: Duration) -> Result<Link, LinkError> {
    if cfg.encrypt && cfg.key.is_none() {
        return Err(LinkError::EncryptWithoutKey);
    }
    let peer = peer_of(&stream)?;
    let io = Timed {
        stream: &stream,
        peer,
        deadline: Instant::now() + timeout,
        timeout,
    };
    let mut theirs = [0u8; PREAMBLE_LEN];
    io.read_exact(&mut theirs)?;
    let hello = parse(&theirs).ok_or(LinkError::NotTwin { peer })?;
    let refuse = |verdict: Verdict, err: LinkError| {
        // Best effort: the refused peer learns why; our caller logs `err`.
        let _ = io.write_all(&preamble(cfg, verdict as u8));
        Err(err)
    };
    if hello.version != LINK_VERSION {
        return refuse(
            Verdict::Version,
            LinkError::Version {
                peer,
                theirs: hello.version,
            },
        );
    }
    match (&cfg.key, hello.mode) {
        (Some(_), 0) => return refuse(Verdict::KeyRequired, LinkError::PeerHasNoKey { peer }),
        (None, m) if m != 0 => {
            return refuse(Verdict::NoKeyHere, LinkError::PeerRequiresKey { peer })
        }
        _ => {}
    }
    let mine = preamble(cfg, Verdict::Proceed as u8);
    io.write_all(&mine)?;
    let encrypted = cfg.encrypt || hello.encrypt;
    let Some(key) = &cfg.key else {
        return finish(stream, peer, None, false);
    };
    let mut prologue = theirs.to_vec();
    prologue.extend_from_slice(&mine);
    let mut hs = builder(key, &prologue)?.build_responder().map_err(noise)?;
    let mut payload = vec![0u8; MAX_RECORD];
    let msg1 = io.read_message()?.ok_or(LinkError::WrongKey { peer })?;
    if hs.read_message(&msg1, &mut payload).is_err() {
        // Tell the initiator its key differs (a zero-length message), then give up.
        let _ = io.write_all(&0u16.to_le_bytes());
        return Err(LinkError::WrongKey { peer });
    }
    let mut buf = vec![0u8; MAX_RECORD];
    let n = hs.write_message(&[], &mut buf).map_err(noise)?;
    io.write_message(&buf[..n])?;
    let transport = hs.into_stateless_transport_mode().map_err(noise)?;
    let confirm = io
        .read_message()?
        .ok_or(LinkError::NoConfirmation { peer })?;
    let n = transport
        .read_message(0, &confirm, &mut payload)
        .map_err(|_| LinkError::NoConfirmation { peer })?;
    if &payload[..n] != CONFIRM {
        return Err(LinkError::NoConfirmation { peer });
    }
    finish(stream, peer, Some((Arc::new(transport), 0, 1)), encrypted)
}

fn peer_of(stream: &TcpStream) -> Result<SocketAddr, LinkError> {
    stream.peer_addr().map_err(|source| LinkError::Io {
        peer: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })
}

/// The stream halves after a handshake. `cipher` carries the transport state and the next
/// nonce of each direction (the initiator's confirmation used nonce 0 of its direction).
fn finish(
    stream: TcpStream,
    peer: SocketAddr,
    cipher: Option<(Arc<snow::StatelessTransportState>, u64, u64)>,
    encrypted: bool,
) -> Result<Link, LinkError> {
    let io = |source| LinkError::Io { peer, source };
    stream.set_read_timeout(None).map_err(io)?;
    stream.set_write_timeout(None).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let authenticated = cipher.is_some();
    let (reader_cipher, writer_cipher) = match cipher.filter(|_| encrypted) {
        Some((t, send_nonce, recv_nonce)) => (Some((t.clone(), recv_nonce)), Some((t, send_nonce))),
        None => (None, None),
    };
    let read_half = stream.try_clone().map_err(io)?;
    Ok(Link {
        reader: LinkReader::new(read_half, peer, reader_cipher),
        writer: LinkWriter::new(stream, peer, writer_cipher),
        peer,
        info: LinkInfo {
            authenticated,
            encrypted,
        },
    })
}

#[cfg(test)]
mod tests;
