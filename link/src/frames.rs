//! `twin-wire` messages over a link: timed reads and whole-frame writes.

use std::net::Shutdown;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio_util::codec::Decoder;
use twin_wire::{DecodeError, EncodeError, FrameCodec, Goodbye, Message};

use crate::stream::{LinkReader, LinkWriter, ReadOutcome};
use crate::LinkError;

/// Why no message could be read.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer was silent for {0:?}")]
    Silent(Duration),
    #[error("corrupt replication frame")]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// The receiving side of a session: link, codec and the bytes not yet decoded.
pub struct FrameReader {
    link: LinkReader,
    codec: FrameCodec,
    buf: BytesMut,
    last_rx: Instant,
}

impl FrameReader {
    pub fn new(link: LinkReader) -> Self {
        FrameReader {
            link,
            codec: FrameCodec::new(),
            buf: BytesMut::with_capacity(1 << 20),
            last_rx: Instant::now(),
        }
    }

    /// When bytes last arrived (or the reader was made).
    pub fn last_rx(&self) -> Instant {
        self.last_rx
    }

    /// Bytes received off the socket so far.
    pub fn wire_bytes(&self) -> u64 {
        self.link.wire_bytes()
    }

    pub fn peer(&self) -> std::net::SocketAddr {
        self.link.peer()
    }

    /// The next message if one arrives within `wait`, `Ok(None)` on a quiet `wait`. A
    /// message already buffered is returned at once: time spent working through a backlog
    /// is not the peer's silence.
    pub fn poll(&mut self, wait: Duration) -> Result<Option<Message>, RecvError> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(m) = self.codec.decode(&mut self.buf)? {
                self.last_rx = Instant::now();
                return Ok(Some(m));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.link.read_into(&mut self.buf, left)? {
                // Bytes arriving prove the peer alive, even short of a whole frame: on a
                // slow link one large epoch frame takes longer than a heartbeat timeout.
                ReadOutcome::Data(_) => self.last_rx = Instant::now(),
                ReadOutcome::Closed => return Err(RecvError::Closed),
                ReadOutcome::TimedOut => return Ok(None),
            }
            if Instant::now() >= deadline {
                // Decode what just arrived, but do not wait again.
                return match self.codec.decode(&mut self.buf)? {
                    Some(m) => {
                        self.last_rx = Instant::now();
                        Ok(Some(m))
                    }
                    None => Ok(None),
                };
            }
        }
    }

    /// The next message, waiting at most `timeout`; [`RecvError::Silent`] after that.
    pub fn recv(&mut self, timeout: Duration) -> Result<Message, RecvError> {
        self.poll(timeout)?.ok_or(RecvError::Silent(timeout))
    }
}

/// The sending side of a session, shared by the threads that write to it (the session
/// loop, the heartbeat thread, the ack reader): one lock, so frames go out whole, which also
/// records when the last write completed.
pub struct FrameWriter {
    inner: Mutex<Inner>,
    codec: FrameCodec,
    peer: std::net::SocketAddr,
    /// A clone of the socket, to shut it down while a writer holds the lock.
    socket: Option<std::net::TcpStream>,
}

struct Inner {
    link: LinkWriter,
    last_write: Instant,
    bytes: u64,
}

impl FrameWriter {
    pub fn new(link: LinkWriter) -> Self {
        FrameWriter {
            peer: link.peer(),
            socket: link.socket_clone().ok(),
            inner: Mutex::new(Inner {
                link,
                last_write: Instant::now(),
                bytes: 0,
            }),
            codec: FrameCodec::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A writer that panicked mid-frame left the stream unusable anyway; the next write
        // fails on the broken connection rather than here.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn peer(&self) -> std::net::SocketAddr {
        self.peer
    }

    /// The codec frames are encoded with.
    pub fn codec(&self) -> FrameCodec {
        self.codec
    }

    /// Writes already-encoded frames.
    pub fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut inner = self.lock();
        inner.link.write_all(bytes)?;
        inner.last_write = Instant::now();
        inner.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Writes encoded frames in two halves with `between` called in the middle, under one
    /// lock: a crash there (a failpoint) leaves a frame cut in half on the wire.
    pub fn write_split(&self, bytes: &[u8], between: impl FnOnce()) -> std::io::Result<()> {
        let mut inner = self.lock();
        let half = bytes.len() / 2;
        inner.link.write_all(&bytes[..half])?;
        between();
        inner.link.write_all(&bytes[half..])?;
        inner.last_write = Instant::now();
        inner.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Encodes and writes one message.
    pub fn send(&self, msg: &Message) -> Result<(), SendError> {
        let mut buf = BytesMut::new();
        self.codec.encode_message(msg, &mut buf)?;
        Ok(self.write(&buf)?)
    }

    /// Best effort, for leaving: waits at most `patience` for the write lock (a writer stuck
    /// on a dead peer holds it) and bounds the write itself by the same patience.
    pub fn send_goodbye(&self, goodbye: Goodbye, patience: Duration) -> bool {
        let until = Instant::now() + patience;
        let mut buf = BytesMut::new();
        if self
            .codec
            .encode_message(&Message::Goodbye(goodbye), &mut buf)
            .is_err()
        {
            return false;
        }
        loop {
            if let Ok(mut inner) = self.inner.try_lock() {
                let _ = inner.link.set_write_timeout(Some(patience));
                let ok = inner.link.write_all(&buf).is_ok();
                let _ = inner.link.set_write_timeout(None);
                if ok {
                    inner.last_write = Instant::now();
                }
                return ok;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// How long nothing was written, or `None` while a write is under way.
    pub fn idle_for(&self) -> Option<Duration> {
        self.inner
            .try_lock()
            .ok()
            .map(|inner| inner.last_write.elapsed())
    }

    /// Bytes written so far (before encryption).
    pub fn bytes_written(&self) -> u64 {
        self.lock().bytes
    }

    /// Half-closes (`Write`) or closes the connection, without waiting for a writer: one
    /// stuck on a dead peer then fails instead of waiting for ever.
    pub fn shutdown(&self, how: Shutdown) {
        if let Some(s) = &self.socket {
            let _ = s.shutdown(how);
        }
    }
}

/// Why a message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("encoding a replication frame failed")]
    Encode(#[from] EncodeError),
    #[error("writing to the peer failed")]
    Io(#[from] std::io::Error),
}
