//! The byte stream of a link after its handshake: plaintext, or AEAD records.
//!
//! A record is a little-endian u16 length and that many bytes of AES-GCM ciphertext (at most
//! 65,535, the tag included). Nonces count records in each direction from where the
//! handshake left them, so a dropped, replayed, reordered or altered record fails to open.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::{LinkError, MAX_RECORD, RECORD_PAYLOAD, TAG_LEN};

type Cipher = Option<(Arc<snow::StatelessTransportState>, u64)>;

/// How much a single socket read takes at most.
const READ_CHUNK: usize = 256 << 10;
/// Ciphertext gathered before it is written out: bounds the writer's buffer for a large
/// frame (an epoch can be tens of MiB) while keeping system calls few.
const WRITE_BATCH: usize = 1 << 20;

/// What one timed read produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// This many plaintext bytes were appended.
    Data(usize),
    /// The peer closed its end (a clean EOF at a record boundary).
    Closed,
    /// Nothing complete arrived within the wait.
    TimedOut,
}

/// The receiving half of a link.
pub struct LinkReader {
    stream: TcpStream,
    peer: SocketAddr,
    cipher: Cipher,
    /// Encrypted bytes of a record not yet complete.
    raw: Vec<u8>,
    chunk: Vec<u8>,
    /// Bytes read off the socket (ciphertext included), for status.
    wire_bytes: u64,
    /// Plaintext read but not yet taken, for the [`Read`] implementation.
    pending: BytesMut,
    /// How long a [`Read::read`] waits; `None` for ever.
    read_timeout: Option<Duration>,
}

impl LinkReader {
    pub(crate) fn new(stream: TcpStream, peer: SocketAddr, cipher: Cipher) -> Self {
        LinkReader {
            stream,
            peer,
            cipher,
            raw: Vec::new(),
            chunk: vec![0u8; READ_CHUNK],
            wire_bytes: 0,
            pending: BytesMut::new(),
            read_timeout: None,
        }
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Bytes received off the socket so far.
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes
    }

    /// How long [`Read::read`] waits before it fails with `TimedOut` (`None`: for ever).
    pub fn set_read_timeout(&mut self, t: Option<Duration>) {
        self.read_timeout = t;
    }

    /// Appends what arrives within `wait` to `out`. Encrypted, only whole records count: a
    /// partial one stays buffered for the next call.
    pub fn read_into(
        &mut self,
        out: &mut BytesMut,
        wait: Duration,
    ) -> Result<ReadOutcome, LinkError> {
        let deadline = Instant::now() + wait;
        loop {
            if self.cipher.is_some() {
                let n = self.open_records(out)?;
                if n > 0 {
                    return Ok(ReadOutcome::Data(n));
                }
            }
            // Past the deadline, still look once: a process that was stalled must read what
            // arrived meanwhile before calling its peer silent.
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|source| LinkError::Io {
                    peer: self.peer,
                    source,
                })?;
            match self.stream.read(&mut self.chunk) {
                Ok(0) => {
                    return if self.raw.is_empty() {
                        Ok(ReadOutcome::Closed)
                    } else {
                        Err(LinkError::Io {
                            peer: self.peer,
                            source: std::io::ErrorKind::UnexpectedEof.into(),
                        })
                    }
                }
                Ok(n) => {
                    self.wire_bytes += n as u64;
                    if self.cipher.is_none() {
                        out.extend_from_slice(&self.chunk[..n]);
                        return Ok(ReadOutcome::Data(n));
                    }
                    self.raw.extend_from_slice(&self.chunk[..n]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Ok(ReadOutcome::TimedOut);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(LinkError::Io {
                        peer: self.peer,
                        source,
                    })
                }
            }
        }
    }

    /// Decrypts every complete record in `raw` into `out`; returns the plaintext bytes added.
    fn open_records(&mut self, out: &mut BytesMut) -> Result<usize, LinkError> {
        let Some((transport, nonce)) = self.cipher.as_mut() else {
            return Ok(0);
        };
        let mut pos = 0;
        let mut added = 0;
        while self.raw.len() - pos >= 2 {
            let len = usize::from(u16::from_le_bytes([self.raw[pos], self.raw[pos + 1]]));
            if len <= TAG_LEN {
                return Err(LinkError::BadRecord {
                    peer: self.peer,
                    len,
                });
            }
            if self.raw.len() - pos - 2 < len {
                break;
            }
            let start = out.len();
            out.resize(start + len - TAG_LEN, 0);
            let record = &self.raw[pos + 2..pos + 2 + len];
            let n = transport
                .read_message(*nonce, record, &mut out[start..])
                .map_err(|_| LinkError::Tampered { peer: self.peer })?;
            out.truncate(start + n);
            *nonce += 1;
            added += n;
            pos += 2 + len;
        }
        self.raw.drain(..pos);
        Ok(added)
    }
}

/// Blocking reads of the plaintext (for tools that relay a link, such as the test proxy).
impl Read for LinkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pending.is_empty() {
            let mut pending = std::mem::take(&mut self.pending);
            let wait = self.read_timeout.unwrap_or(Duration::from_secs(3600));
            let r = self.read_into(&mut pending, wait);
            self.pending = pending;
            match r.map_err(std::io::Error::other)? {
                ReadOutcome::Data(_) => {}
                ReadOutcome::TimedOut if self.read_timeout.is_some() => {
                    return Err(std::io::ErrorKind::TimedOut.into())
                }
                ReadOutcome::TimedOut => {}
                ReadOutcome::Closed => return Ok(0),
            }
        }
        let n = out.len().min(self.pending.len());
        out[..n].copy_from_slice(&self.pending.split_to(n));
        Ok(n)
    }
}

/// The sending half of a link.
pub struct LinkWriter {
    stream: TcpStream,
    peer: SocketAddr,
    cipher: Cipher,
    sealed: Vec<u8>,
}

impl LinkWriter {
    pub(crate) fn new(stream: TcpStream, peer: SocketAddr, cipher: Cipher) -> Self {
        LinkWriter {
            stream,
            peer,
            cipher,
            sealed: Vec::new(),
        }
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Whether records are encrypted.
    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// Writes all of `bytes` (sealed into records when encrypted).
    pub fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let Some((transport, nonce)) = self.cipher.as_mut() else {
            return self.stream.write_all(bytes);
        };
        self.sealed.clear();
        for chunk in bytes.chunks(RECORD_PAYLOAD) {
            let at = self.sealed.len();
            self.sealed.resize(at + 2 + chunk.len() + TAG_LEN, 0);
            let n = transport
                .write_message(*nonce, chunk, &mut self.sealed[at + 2..])
                .map_err(|e| std::io::Error::other(format!("sealing a record: {e}")))?;
            debug_assert!(n <= MAX_RECORD);
            self.sealed[at..at + 2].copy_from_slice(&(n as u16).to_le_bytes());
            self.sealed.truncate(at + 2 + n);
            *nonce += 1;
            if self.sealed.len() >= WRITE_BATCH {
                self.stream.write_all(&self.sealed)?;
                self.sealed.clear();
            }
        }
        self.stream.write_all(&self.sealed)
    }

    /// Sets (or clears) the socket's write timeout: a peer that stops reading must not block
    /// a writer for ever where a bound is wanted.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.stream.set_write_timeout(t)
    }

    /// Half-closes (`Write`) or closes the connection.
    pub fn shutdown(&self, how: Shutdown) {
        let _ = self.stream.shutdown(how);
    }

    /// Another handle on the socket (for shutting it down from another thread).
    pub fn socket_clone(&self) -> std::io::Result<TcpStream> {
        self.stream.try_clone()
    }
}

impl Write for LinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
