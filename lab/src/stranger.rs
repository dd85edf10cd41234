//! Peers that are not what they claim: a stranger that dials a backup and speaks the
//! replication protocol as it likes, and a fake backup that a primary dials. The attack
//! scenarios of `tests/tests/faults.rs` use them to show that neither can take or stop a
//! protected VM.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use twin_link::{FrameReader, FrameWriter, LinkConfig, LinkError, RecvError};
use twin_wire::{Goodbye, GoodbyeReason, Hello, HelloAck, Message, Role, VmDescription, VmId};

use crate::error::{HarnessError, Result};
use crate::netns::Netns;

/// How long a stranger's link handshake may take.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected peer speaking frames (either end).
pub struct Peer {
    pub reader: FrameReader,
    pub writer: FrameWriter,
}

impl Peer {
    fn from_link(link: twin_link::Link) -> Self {
        Peer {
            reader: FrameReader::new(link.reader),
            writer: FrameWriter::new(link.writer),
        }
    }

    /// Dials `addr` from inside `ns` and runs the link handshake with `link` (no key, or a
    /// key that may not be the pair's). The link error, if the other side refused.
    pub fn dial(
        ns: &Netns,
        addr: SocketAddr,
        link: &LinkConfig,
    ) -> Result<std::result::Result<Peer, LinkError>> {
        let stream = ns
            .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?
            .map_err(|e| HarnessError::io(format!("stranger: connecting to {addr}"), e))?;
        Ok(twin_link::connect(stream, link, LINK_TIMEOUT).map(Peer::from_link))
    }

    pub fn send(&self, msg: &Message) -> Result<()> {
        self.writer
            .send(msg)
            .map_err(|e| HarnessError::InvalidArgument(format!("stranger: sending: {e}")))
    }

    pub fn recv(&mut self, timeout: Duration) -> std::result::Result<Message, RecvError> {
        self.reader.recv(timeout)
    }

    /// Reads until the peer closes or `timeout`; every message that arrived.
    pub fn drain(&mut self, timeout: Duration) -> (Vec<Message>, Option<RecvError>) {
        let until = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (got, None);
            }
            match self.reader.recv(left) {
                Ok(m) => got.push(m),
                Err(RecvError::Silent(_)) => return (got, None),
                Err(e) => return (got, Some(e)),
            }
        }
    }
}

/// A `Hello` from a primary of `vm` at `generation`.
pub fn hello(vm: VmId, generation: u64) -> Message {
    Message::Hello(Hello::new(Role::Primary, vm, generation))
}

/// A VM description of `mem_size` bytes.
pub fn description(mem_size: u64, mac: [u8; 6]) -> Message {
    Message::VmDescription(VmDescription {
        mem_size,
        page_size: 4096,
        vcpus: 1,
        mac,
        config: Vec::new(),
        disks: Vec::new(),
    })
}

/// A goodbye.
pub fn goodbye(reason: GoodbyeReason, detail: &str) -> Message {
    Message::Goodbye(Goodbye::new(reason, detail))
}

/// A random VM identity.
pub fn random_vm() -> VmId {
    let mut id = [0u8; 16];
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    id.copy_from_slice(&t.to_le_bytes());
    id[0] ^= 0xa5;
    VmId(id)
}

/// A fake backup listening in `ns` on `addr`: it accepts one primary, completes the link
/// handshake with `link` and answers its `Hello`, then hands the session to the test.
pub struct FakeBackup {
    listener: TcpListener,
    link: LinkConfig,
}

impl FakeBackup {
    pub fn listen(ns: &Netns, addr: SocketAddr, link: LinkConfig) -> Result<Self> {
        let listener = ns
            .enter(|| TcpListener::bind(addr))?
            .map_err(|e| HarnessError::io(format!("fake backup: binding {addr}"), e))?;
        Ok(FakeBackup { listener, link })
    }

    /// Waits for a primary; the link handshake's outcome, then (if it succeeded) the
    /// primary's `Hello`, answered with a `HelloAck`.
    pub fn accept(
        &self,
        timeout: Duration,
    ) -> Result<std::result::Result<(Peer, Hello), LinkError>> {
        self.listener
            .set_nonblocking(true)
            .map_err(|e| HarnessError::io("fake backup: nonblocking", e))?;
        let until = Instant::now() + timeout;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= until {
                        return Err(HarnessError::Timeout {
                            what: "a primary to dial the fake backup".into(),
                            after: timeout,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(HarnessError::io("fake backup: accept", e)),
            }
        };
        stream
            .set_nonblocking(false)
            .map_err(|e| HarnessError::io("fake backup: blocking", e))?;
        let mut peer = match twin_link::accept(stream, &self.link, LINK_TIMEOUT) {
            Ok(l) => Peer::from_link(l),
            Err(e) => return Ok(Err(e)),
        };
        let hello = match peer.recv(LINK_TIMEOUT) {
            Ok(Message::Hello(h)) => h,
            other => {
                return Err(HarnessError::InvalidArgument(format!(
                    "fake backup: expected Hello, got {other:?}"
                )))
            }
        };
        peer.send(&Message::HelloAck(HelloAck {
            protocol_version: hello.protocol_version,
            software_version: hello.software_version.clone(),
            vm_id: hello.vm_id,
            generation: hello.generation,
        }))?;
        Ok(Ok((peer, hello)))
    }
}
