//! Property tests of compressed epochs (`CompressedPages`: raw, LZ4 and deltas against the
//! backup's committed pages).
//!
//! A primary model writes epochs of partly changed pages, encoding each page as the real
//! primary does (a delta against what it last sent for the page, else LZ4, else raw); the
//! stream is fed through the decoder and the assembler of a backup model that applies
//! each yielded epoch to its replica. Checked, for any byte flipped in any frame (the frame
//! re-checksummed, so only the page codec and the epoch checksum can catch it) and any
//! chunking of the stream:
//! - nothing panics;
//! - an epoch is yielded only if its pages are byte-identical to those sent, and then the
//!   replica equals the primary's memory as of that epoch;
//! - an unmutated stream yields every epoch, and the replica ends identical to the one an
//!   uncompressed stream of the same epochs builds.

use std::collections::HashMap;

use bytes::BytesMut;
use proptest::prelude::*;
use tokio_util::codec::Decoder;
use twin_wire::pagecodec::{encode_lz4, encode_xor_lz4, max_lz4_len};
use twin_wire::{
    BasePages, EncodedPageRef, EpochAssembler, EpochBegin, EpochEncoder, EpochMessage, FrameCodec,
    FrameHeader, Geometry, PageEncoding, PageRef, HEADER_LEN,
};

const PS: usize = 4096;
const PAGES: u64 = 32;

#[derive(Default, Clone, PartialEq, Debug)]
struct Replica(HashMap<u64, Vec<u8>>);

impl BasePages for Replica {
    fn read_committed_page(&self, index: u64, buf: &mut [u8]) -> std::io::Result<()> {
        match self.0.get(&index) {
            Some(p) => buf.copy_from_slice(p),
            None => buf.fill(0),
        }
        Ok(())
    }
}

/// One page write: page `index`, bytes `[from, from + len)` set from `seed` (a whole
/// random page when `len` is 0).
#[derive(Debug, Clone)]
struct Write {
    index: u64,
    from: usize,
    len: usize,
    seed: u64,
}

fn fill(buf: &mut [u8], mut x: u64) {
    x |= 1;
    for b in buf {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

fn write_strategy() -> impl Strategy<Value = Write> {
    (0..PAGES, 0..PS, 0..PS / 2, any::<u64>()).prop_map(|(index, from, len, seed)| Write {
        index,
        from: from.min(PS - len.max(1)),
        len,
        seed,
    })
}

/// Epochs of distinct-page writes.
fn session_strategy() -> impl Strategy<Value = Vec<Vec<Write>>> {
    prop::collection::vec(prop::collection::vec(write_strategy(), 0..8), 1..5).prop_map(|eps| {
        eps.into_iter()
            .map(|ws| {
                let mut seen = std::collections::HashSet::new();
                ws.into_iter().filter(|w| seen.insert(w.index)).collect()
            })
            .collect()
    })
}

/// The epochs' pages (in send order) and their encoded streams, compressed and raw.
struct Sent {
    epochs: Vec<Vec<(u64, Vec<u8>)>>,
    /// Memory after each epoch.
    memory: Vec<HashMap<u64, Vec<u8>>>,
    compressed: Vec<Vec<u8>>,
    raw: Vec<Vec<u8>>,
}

fn encode(session: &[Vec<Write>]) -> Sent {
    let codec = FrameCodec::new();
    let mut memory: HashMap<u64, Vec<u8>> = HashMap::new();
    // What the primary last sent per page: the delta base.
    let mut last_sent: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut out = Sent {
        epochs: Vec::new(),
        memory: Vec::new(),
        compressed: Vec::new(),
        raw: Vec::new(),
    };
    for (n, writes) in session.iter().enumerate() {
        let epoch = n as u64 + 1;
        let mut pages = Vec::new();
        for w in writes {
            let page = memory.entry(w.index).or_insert_with(|| vec![0; PS]);
            if w.len == 0 {
                fill(page, w.seed);
            } else {
                fill(&mut page[w.from..w.from + w.len], w.seed);
            }
            pages.push((w.index, page.clone()));
        }
        let mut encoded = Vec::new();
        let mut scratch = vec![0; PS];
        for (index, page) in &pages {
            let mut buf = vec![0; max_lz4_len(PS)];
            let delta = last_sent
                .get(index)
                .and_then(|b| encode_xor_lz4(page, b, &mut scratch, &mut buf))
                .map(|n| (PageEncoding::XorLz4, buf[..n].to_vec()));
            let e = delta.or_else(|| {
                let mut buf = vec![0; max_lz4_len(PS)];
                encode_lz4(page, &mut buf).map(|n| (PageEncoding::Lz4, buf[..n].to_vec()))
            });
            encoded.push(e.unwrap_or((PageEncoding::Raw, page.clone())));
        }
        for (index, page) in &pages {
            last_sent.insert(*index, page.clone());
        }
        let begin = EpochBegin {
            epoch,
            page_count: pages.len() as u64,
            state_len: 3,
        };
        let mut c = BytesMut::new();
        let mut enc = EpochEncoder::begin(codec, begin, PS as u32, &mut c).unwrap();
        let refs: Vec<EncodedPageRef<'_>> = pages
            .iter()
            .zip(&encoded)
            .map(|((index, raw), (encoding, data))| EncodedPageRef {
                index: *index,
                encoding: *encoding,
                data,
                raw,
            })
            .collect();
        for chunk in refs.chunks(3) {
            enc.compressed_pages(chunk, &mut c).unwrap();
        }
        enc.state(b"abc", &mut c).unwrap();
        enc.end(&mut c).unwrap();
        let mut r = BytesMut::new();
        let mut enc = EpochEncoder::begin(codec, begin, PS as u32, &mut r).unwrap();
        let refs: Vec<PageRef<'_>> = pages
            .iter()
            .map(|(index, data)| PageRef {
                index: *index,
                data,
            })
            .collect();
        enc.pages(&refs, &mut r).unwrap();
        enc.state(b"abc", &mut r).unwrap();
        enc.end(&mut r).unwrap();
        out.compressed.push(c.to_vec());
        out.raw.push(r.to_vec());
        out.epochs.push(pages);
        out.memory.push(memory.clone());
    }
    out
}

/// Splits an encoded stream into its frames.
fn frames(stream: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let h = FrameHeader::parse(stream[at..at + HEADER_LEN].try_into().unwrap()).unwrap();
        let end = at + HEADER_LEN + h.payload_len as usize;
        out.push(stream[at..end].to_vec());
        at = end;
    }
    out
}

/// Flips byte `at` of the payload of `frame` and fixes its CRC.
fn flip(frame: &mut [u8], at: usize, xor: u8) {
    let payload_len = frame.len() - HEADER_LEN;
    if payload_len == 0 {
        return;
    }
    frame[HEADER_LEN + at % payload_len] ^= xor.max(1);
    let mut h = FrameHeader::parse(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
    h.payload_crc = twin_wire_crc(&frame[HEADER_LEN..]);
    frame[..HEADER_LEN].copy_from_slice(&h.to_bytes());
}

fn twin_wire_crc(b: &[u8]) -> u64 {
    let mut d = crc64fast::Digest::new();
    d.write(b);
    d.sum64()
}

/// Feeds `stream` in `chunk`-sized pieces through decoder and assembler; applies each
/// yielded epoch to the replica. Returns the replica and the epochs yielded (with pages).
/// The pages of an epoch, in order: (index, contents).
type EpochPages = Vec<(u64, Vec<u8>)>;

fn receive(stream: &[u8], chunk: usize) -> (Replica, Vec<(u64, EpochPages)>) {
    let geometry = Geometry::new(PAGES * PS as u64, PS as u32).unwrap();
    let mut asm = EpochAssembler::new(geometry, 1);
    let mut replica = Replica::default();
    let mut yielded = Vec::new();
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    for piece in stream.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            let msg = match codec.decode(&mut buf) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                // As the backup does: a bad frame ends the session.
                Err(_) => return (replica, yielded),
            };
            let Ok(em) = EpochMessage::try_from(msg) else {
                return (replica, yielded);
            };
            match asm.push_with(em, &replica) {
                Ok(Some(c)) => {
                    let pages: EpochPages =
                        c.pages.iter().map(|p| (p.index, p.data.to_vec())).collect();
                    for (i, d) in &pages {
                        replica.0.insert(*i, d.clone());
                    }
                    yielded.push((c.epoch, pages));
                }
                Ok(None) => {}
                Err(_) => return (replica, yielded),
            }
        }
    }
    (replica, yielded)
}

fn check(sent: &Sent, replica: &Replica, yielded: &[(u64, EpochPages)]) {
    for (k, (epoch, pages)) in yielded.iter().enumerate() {
        assert_eq!(*epoch, k as u64 + 1, "epochs in order from the first");
        assert_eq!(pages, &sent.epochs[k], "epoch {epoch} byte-identical");
    }
    let expected = match yielded.len() {
        0 => HashMap::new(),
        n => sent.memory[n - 1].clone(),
    };
    assert_eq!(
        replica.0, expected,
        "the replica is the memory of its last epoch"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn compressed_and_raw_streams_give_identical_replicas(
        session in session_strategy(),
        chunk in 1usize..9000,
    ) {
        let sent = encode(&session);
        let c: Vec<u8> = sent.compressed.concat();
        let r: Vec<u8> = sent.raw.concat();
        let (rc, yc) = receive(&c, chunk);
        let (rr, yr) = receive(&r, chunk);
        prop_assert_eq!(yc.len(), session.len());
        check(&sent, &rc, &yc);
        prop_assert_eq!(&rc, &rr);
        prop_assert_eq!(yc, yr);
    }

    #[test]
    fn a_flipped_byte_in_a_compressed_stream_never_yields_a_wrong_epoch(
        session in session_strategy(),
        which in any::<prop::sample::Index>(),
        at in any::<usize>(),
        xor in any::<u8>(),
        chunk in 1usize..9000,
    ) {
        let sent = encode(&session);
        let mut all: Vec<Vec<u8>> = sent.compressed.iter().flat_map(|s| frames(s)).collect();
        let i = which.index(all.len());
        flip(&mut all[i], at, xor);
        let (replica, yielded) = receive(&all.concat(), chunk);
        check(&sent, &replica, &yielded);
    }
}
