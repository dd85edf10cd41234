//! Handshake and stream tests over real loopback TCP connections.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use bytes::BytesMut;

use super::*;

const T: Duration = Duration::from_secs(5);

fn key(b: u8) -> Key {
    Key::from_hex(&format!("{b:02x}").repeat(KEY_LEN)).unwrap()
}

/// Runs `accept` with `b` on one end and `connect` with `a` on the other.
fn pair(a: LinkConfig, b: LinkConfig) -> (Result<Link, LinkError>, Result<Link, LinkError>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        accept(s, &b, T)
    });
    let c = connect(TcpStream::connect(addr).unwrap(), &a, T);
    (c, server.join().unwrap())
}

fn round_trip(mut a: Link, mut b: Link, len: usize) {
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    let d2 = data.clone();
    let w = std::thread::spawn(move || {
        a.writer.write_all(&d2).unwrap();
        a
    });
    let mut got = BytesMut::new();
    while got.len() < len {
        match b.reader.read_into(&mut got, T).unwrap() {
            ReadOutcome::Data(_) => {}
            other => panic!("{other:?} after {} of {len} bytes", got.len()),
        }
    }
    assert!(got[..] == data[..], "data differs");
    let a = w.join().unwrap();
    drop(a);
    assert_eq!(
        b.reader.read_into(&mut got, T).unwrap(),
        ReadOutcome::Closed
    );
}

#[test]
fn same_key_authenticates_both_ways_plain_and_encrypted() {
    for (ea, eb) in [(false, false), (true, false), (false, true), (true, true)] {
        let (c, s) = pair(
            LinkConfig::with_key(key(1), ea),
            LinkConfig::with_key(key(1), eb),
        );
        let (c, s) = (c.unwrap(), s.unwrap());
        let want = LinkInfo {
            authenticated: true,
            encrypted: ea || eb,
        };
        assert_eq!(c.info, want);
        assert_eq!(s.info, want);
        // Larger than a record and than the write batch: records split and join.
        round_trip(c, s, 3 << 20);
    }
}

#[test]
fn no_key_on_either_side_is_a_plain_link() {
    let (c, s) = pair(LinkConfig::insecure(), LinkConfig::insecure());
    let (c, s) = (c.unwrap(), s.unwrap());
    assert!(!c.info.authenticated && !s.info.authenticated);
    round_trip(c, s, 100_000);
}

#[test]
fn wrong_key_is_named_on_both_sides() {
    let (c, s) = pair(
        LinkConfig::with_key(key(1), false),
        LinkConfig::with_key(key(2), false),
    );
    assert!(
        matches!(c, Err(LinkError::WrongKey { .. })),
        "{:?}",
        c.err()
    );
    let e = s.err().unwrap();
    assert!(matches!(e, LinkError::WrongKey { .. }), "{e}");
    assert!(e.to_string().contains("key differs"), "{e}");
}

#[test]
fn a_key_on_one_side_only_is_named_on_both_sides() {
    let (c, s) = pair(LinkConfig::insecure(), LinkConfig::with_key(key(1), false));
    let c = c.err().unwrap();
    assert!(matches!(c, LinkError::PeerRequiresKey { .. }), "{c}");
    assert!(c.to_string().contains("--key-file"), "{c}");
    assert!(matches!(s, Err(LinkError::PeerHasNoKey { .. })));

    let (c, s) = pair(LinkConfig::with_key(key(1), false), LinkConfig::insecure());
    assert!(matches!(c, Err(LinkError::PeerHasNoKey { .. })));
    assert!(matches!(s, Err(LinkError::PeerRequiresKey { .. })));
}

#[test]
fn encryption_needs_a_key() {
    let cfg = LinkConfig {
        key: None,
        encrypt: true,
    };
    let (c, _s) = pair(cfg, LinkConfig::insecure());
    assert!(matches!(c, Err(LinkError::EncryptWithoutKey)));
}

#[test]
fn a_peer_that_is_not_twin_is_named() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 16];
        s.read_exact(&mut b).unwrap();
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
    });
    let c = connect(
        TcpStream::connect(addr).unwrap(),
        &LinkConfig::insecure(),
        T,
    );
    assert!(matches!(c, Err(LinkError::NotTwin { .. })), "{:?}", c.err());
    server.join().unwrap();

    // And the other way: a client that sends anything but a preamble.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    });
    let (s, _) = l.accept().unwrap();
    let r = accept(s, &LinkConfig::with_key(key(1), false), T);
    assert!(matches!(r, Err(LinkError::NotTwin { .. })), "{:?}", r.err());
    client.join().unwrap();
}

#[test]
fn a_silent_peer_times_out_the_handshake() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let _idle = TcpStream::connect(addr).unwrap();
    let (s, _) = l.accept().unwrap();
    let t0 = std::time::Instant::now();
    let r = accept(
        s,
        &LinkConfig::with_key(key(1), false),
        Duration::from_millis(300),
    );
    assert!(matches!(r, Err(LinkError::Timeout { .. })), "{:?}", r.err());
    assert!(t0.elapsed() < Duration::from_secs(2));
}

/// Records what a real initiator sends, then replays it to a fresh responder: the replayer
/// cannot confirm the new session key, so the responder refuses it.
#[test]
fn a_replayed_handshake_is_refused() {
    // A relay that records the initiator's bytes.
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = backend.accept().unwrap();
        let first = accept(s, &LinkConfig::with_key(key(1), false), T);
        assert!(first.is_ok(), "{:?}", first.err());
        drop(first);
        let (s, _) = backend.accept().unwrap();
        accept(s, &LinkConfig::with_key(key(1), false), T)
    });
    let recorder = std::thread::spawn(move || {
        let (mut from, _) = relay.accept().unwrap();
        let mut to = TcpStream::connect(backend_addr).unwrap();
        let mut to_r = to.try_clone().unwrap();
        let mut from_w = from.try_clone().unwrap();
        let back = std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = to_r.read(&mut b) {
                if n == 0 || from_w.write_all(&b[..n]).is_err() {
                    break;
                }
            }
        });
        // preamble (16), then msg1 (2 + 48): everything up to the confirmation.
        let mut recorded = Vec::new();
        for len in [16, 2 + 48] {
            let mut part = vec![0u8; len];
            from.read_exact(&mut part).unwrap();
            to.write_all(&part).unwrap();
            recorded.extend_from_slice(&part);
        }
        let mut rest = [0u8; 4096];
        if let Ok(n) = from.read(&mut rest) {
            let _ = to.write_all(&rest[..n]);
        }
        drop(to);
        let _ = back.join();
        recorded
    });
    let c = connect(
        TcpStream::connect(relay_addr).unwrap(),
        &LinkConfig::with_key(key(1), false),
        T,
    );
    assert!(c.is_ok(), "{:?}", c.err());
    drop(c);
    let recorded = recorder.join().unwrap();
    // The replay: same preamble and first message, then whatever the attacker likes.
    let mut s = TcpStream::connect(backend_addr).unwrap();
    s.write_all(&recorded[..16]).unwrap();
    let mut answer = [0u8; 16];
    s.read_exact(&mut answer).unwrap();
    s.write_all(&recorded[16..]).unwrap();
    let mut msg2 = [0u8; 2 + 48];
    s.read_exact(&mut msg2).unwrap();
    s.write_all(&[20, 0]).unwrap();
    s.write_all(&[0xAA; 20]).unwrap();
    let r = server.join().unwrap();
    assert!(
        matches!(r, Err(LinkError::NoConfirmation { .. })),
        "{:?}",
        r.err()
    );
}

#[test]
fn an_altered_record_is_detected() {
    // A relay that flips one byte of the first record after the handshake.
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = backend.accept().unwrap();
        let mut link = accept(s, &LinkConfig::with_key(key(3), true), T).unwrap();
        let mut buf = BytesMut::new();
        link.reader.read_into(&mut buf, T)
    });
    let relay_thread = std::thread::spawn(move || {
        let (mut from, _) = relay.accept().unwrap();
        let mut to = TcpStream::connect(backend_addr).unwrap();
        let mut to_r = to.try_clone().unwrap();
        let mut from_w = from.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = to_r.read(&mut b) {
                if n == 0 || from_w.write_all(&b[..n]).is_err() {
                    break;
                }
            }
        });
        // preamble, msg1 and the confirmation (2 + 8 + 16) pass untouched.
        for len in [16, 2 + 48, 2 + 24] {
            let mut part = vec![0u8; len];
            from.read_exact(&mut part).unwrap();
            to.write_all(&part).unwrap();
        }
        let mut rec = vec![0u8; 2 + 100 + 16];
        from.read_exact(&mut rec).unwrap();
        rec[10] ^= 1;
        to.write_all(&rec).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let mut c = connect(
        TcpStream::connect(relay_addr).unwrap(),
        &LinkConfig::with_key(key(3), true),
        T,
    )
    .unwrap();
    c.writer.write_all(&[7u8; 100]).unwrap();
    let r = server.join().unwrap();
    assert!(matches!(r, Err(LinkError::Tampered { .. })), "{r:?}");
    relay_thread.join().unwrap();
}
