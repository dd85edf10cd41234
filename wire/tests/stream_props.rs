//! Property tests of the codec and the epoch assembler against corrupted streams.
//!
//! A valid session stream (epochs interleaved with heartbeats) is encoded, mutated
//! (truncation, bit flips, duplicated / reordered / dropped frames, frames re-checksummed
//! after corruption so only the end-to-end checksum can catch them, forged lengths, garbage),
//! fed to the decoder in arbitrary chunks and then to the assembler. Checked:
//! - nothing panics;
//! - allocation stays bounded by the input size and the codec's frame cap, whatever lengths
//!   the stream claims;
//! - an epoch is yielded only if it is byte-identical to the epoch of that number that was
//!   sent, and an unmutated stream yields every epoch.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use tokio_util::codec::{Decoder, Encoder};
use twin_wire::{
    EpochAssembler, EpochBegin, EpochEncoder, EpochMessage, FrameCodec, FrameHeader, Geometry,
    Heartbeat, Message, PageRef, HEADER_LEN,
};

// ---- allocation accounting (this thread only, while enabled) ----

struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    // `try_with` so that allocations during thread teardown are simply not counted.
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let live = LIVE.with(|l| {
                l.set(l.get() + size as isize);
                l.get()
            });
            PEAK.with(|p| p.set(p.get().max(live)));
            LARGEST.with(|m| m.set(m.get().max(size)));
        }
    });
}

fn note_free(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            LIVE.with(|l| l.set(l.get() - size as isize));
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and only
// adds bookkeeping in const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        // SAFETY: `ptr` was allocated by `System` with `layout` (all allocations go there).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Run `f` and return (its result, peak live bytes above the start, largest allocation).
fn measure<T>(f: impl FnOnce() -> T) -> (T, isize, usize) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    LARGEST.with(|m| m.set(0));
    TRACK.with(|t| t.set(true));
    let out = f();
    TRACK.with(|t| t.set(false));
    (out, PEAK.with(Cell::get), LARGEST.with(Cell::get))
}

// ---- the sent session ----

const PAGE_SIZE: u32 = 512;
const PAGES: u64 = 32;
/// The codec cap used by the test: small, so that "bounded by the cap" is checkable.
const CAP: u32 = 64 << 10;

#[derive(Debug, Clone)]
struct SentEpoch {
    epoch: u64,
    pages: Vec<(u64, Vec<u8>)>,
    state: Vec<u8>,
    batch: usize,
}

fn epoch_strategy() -> impl Strategy<Value = (Vec<(u64, u8)>, Vec<u8>, usize)> {
    (
        proptest::sample::subsequence((0..PAGES).collect::<Vec<_>>(), 0..6)
            .prop_flat_map(|idx| {
                let n = idx.len();
                (Just(idx), proptest::collection::vec(any::<u8>(), n))
            })
            .prop_map(|(idx, salts)| idx.into_iter().zip(salts).collect::<Vec<_>>())
            .prop_shuffle(),
        proptest::collection::vec(any::<u8>(), 0..48),
        1usize..4,
    )
}

fn session_strategy() -> impl Strategy<Value = Vec<SentEpoch>> {
    proptest::collection::vec(epoch_strategy(), 1..4).prop_map(|epochs| {
        epochs
            .into_iter()
            .enumerate()
            .map(|(i, (pages, state, batch))| SentEpoch {
                epoch: i as u64 + 1,
                pages: pages
                    .into_iter()
                    .map(|(index, salt)| {
                        let data = (0..PAGE_SIZE as usize)
                            .map(|b| (b as u8).wrapping_mul(salt | 1) ^ index as u8)
                            .collect();
                        (index, data)
                    })
                    .collect(),
                state,
                batch,
            })
            .collect()
    })
}

/// Encode the session, returning each frame separately.
fn encode_session(session: &[SentEpoch]) -> Vec<Vec<u8>> {
    let codec = FrameCodec::with_max_frame_len(CAP);
    let mut frames = Vec::new();
    let mut take = |buf: &mut BytesMut| {
        // Split `buf` into frames by walking the headers we just wrote.
        while !buf.is_empty() {
            let header = FrameHeader::parse(buf.first_chunk::<HEADER_LEN>().unwrap()).unwrap();
            let len = HEADER_LEN + header.payload_len as usize;
            frames.push(buf.split_to(len).to_vec());
        }
    };
    for (seq, e) in session.iter().enumerate() {
        let mut buf = BytesMut::new();
        let mut enc = EpochEncoder::begin(
            codec,
            EpochBegin {
                epoch: e.epoch,
                page_count: e.pages.len() as u64,
                state_len: e.state.len() as u64,
            },
            PAGE_SIZE,
            &mut buf,
        )
        .unwrap();
        take(&mut buf);
        let refs: Vec<PageRef<'_>> = e
            .pages
            .iter()
            .map(|(index, data)| PageRef {
                index: *index,
                data,
            })
            .collect();
        for chunk in refs.chunks(e.batch) {
            enc.pages(chunk, &mut buf).unwrap();
            take(&mut buf);
        }
        // Heartbeats may be interleaved with an epoch on the same connection.
        let mut c = codec;
        c.encode(
            Message::Heartbeat(Heartbeat {
                seq: seq as u64,
                sent_at_ns: 0,
                last_epoch: e.epoch,
            }),
            &mut buf,
        )
        .unwrap();
        take(&mut buf);
        enc.state(&e.state, &mut buf).unwrap();
        take(&mut buf);
        enc.end(&mut buf).unwrap();
        take(&mut buf);
    }
    frames
}

// ---- mutations ----

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(prop::sample::Index),
    FlipBit(prop::sample::Index),
    Duplicate(prop::sample::Index),
    Swap(prop::sample::Index, prop::sample::Index),
    Drop(prop::sample::Index),
    /// Flip a payload bit and fix both frame checksums: only the epoch checksum (or the
    /// assembler's structural checks) can catch it.
    Recrc(prop::sample::Index, prop::sample::Index),
    /// Rewrite a frame's length with a valid header check.
    ForgeLength(prop::sample::Index, u32),
    Garbage(prop::sample::Index, Vec<u8>),
}

fn mutation_strategy() -> impl Strategy<Value = Mutation> {
    use prop::sample::Index;
    prop_oneof![
        any::<Index>().prop_map(Mutation::Truncate),
        any::<Index>().prop_map(Mutation::FlipBit),
        any::<Index>().prop_map(Mutation::Duplicate),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        any::<Index>().prop_map(Mutation::Drop),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Recrc(a, b)),
        (any::<Index>(), any::<u32>()).prop_map(|(a, l)| Mutation::ForgeLength(a, l)),
        (
            any::<Index>(),
            proptest::collection::vec(any::<u8>(), 1..40)
        )
            .prop_map(|(a, g)| Mutation::Garbage(a, g)),
    ]
}

/// Give `frame` a header with `payload_len` and valid checks (no-op on inserted garbage).
fn reheader(frame: &mut [u8], payload_len: u32) {
    let Some(Ok(mut h)) = frame.first_chunk::<HEADER_LEN>().map(FrameHeader::parse) else {
        return;
    };
    h.payload_len = payload_len;
    h.payload_crc = {
        let mut d = crc64fast::Digest::new();
        d.write(&frame[HEADER_LEN..]);
        d.sum64()
    };
    frame[..HEADER_LEN].copy_from_slice(&h.to_bytes());
}

/// Apply frame-level mutations first (while frames are known), then byte-level ones.
fn apply(mut frames: Vec<Vec<u8>>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if frames.is_empty() {
            break;
        }
        match m {
            Mutation::Duplicate(i) => {
                let i = i.index(frames.len());
                let f = frames[i].clone();
                frames.insert(i + 1, f);
            }
            Mutation::Swap(a, b) => {
                let (a, b) = (a.index(frames.len()), b.index(frames.len()));
                frames.swap(a, b);
            }
            Mutation::Drop(i) => {
                frames.remove(i.index(frames.len()));
            }
            Mutation::Recrc(i, bit) => {
                let n = frames.len();
                let f = &mut frames[i.index(n)];
                let payload_bits = f.len().saturating_sub(HEADER_LEN) * 8;
                if payload_bits > 0 {
                    let bit = bit.index(payload_bits);
                    f[HEADER_LEN + bit / 8] ^= 1 << (bit % 8);
                    let len = (f.len() - HEADER_LEN) as u32;
                    reheader(f, len);
                }
            }
            Mutation::ForgeLength(i, len) => {
                let n = frames.len();
                let f = &mut frames[i.index(n)];
                reheader(f, *len);
            }
            Mutation::Garbage(i, g) => {
                let i = i.index(frames.len() + 1);
                frames.insert(i, g.clone());
            }
            Mutation::Truncate(_) | Mutation::FlipBit(_) => {}
        }
    }
    let mut bytes: Vec<u8> = frames.concat();
    for m in mutations {
        match m {
            Mutation::Truncate(at) if !bytes.is_empty() => {
                bytes.truncate(at.index(bytes.len()));
            }
            Mutation::FlipBit(bit) if !bytes.is_empty() => {
                let bit = bit.index(bytes.len() * 8);
                bytes[bit / 8] ^= 1 << (bit % 8);
            }
            _ => {}
        }
    }
    bytes
}

// ---- the receiver ----

#[derive(Debug, Default)]
struct Outcome {
    yielded: Vec<twin_wire::CompleteEpoch>,
    decode_errors: usize,
    assemble_errors: usize,
}

/// Feed `bytes` in `chunks`-sized pieces (cycled) through the codec and the assembler, the
/// way the backup's receive loop does, except that it continues after non-fatal errors to
/// exercise more of the state machine.
fn receive(bytes: &[u8], chunks: &[usize]) -> Outcome {
    let mut codec = FrameCodec::with_max_frame_len(CAP);
    let geometry = Geometry::new(PAGES * u64::from(PAGE_SIZE), PAGE_SIZE).unwrap();
    let mut asm = EpochAssembler::new(geometry, 1);
    let mut out = Outcome::default();
    let mut buf = BytesMut::new();
    let mut pos = 0;
    let mut chunk_iter = chunks.iter().cycle();
    let mut handle = |msg: Message, out: &mut Outcome| {
        if let Ok(em) = EpochMessage::try_from(msg) {
            match asm.push(em) {
                Ok(Some(c)) => out.yielded.push(c),
                Ok(None) => {}
                Err(_) => out.assemble_errors += 1,
            }
        }
    };
    'feed: loop {
        let eof = pos >= bytes.len();
        if !eof {
            let n = (*chunk_iter.next().unwrap()).clamp(1, bytes.len() - pos);
            buf.extend_from_slice(&bytes[pos..pos + n]);
            pos += n;
        }
        loop {
            let r = if eof {
                codec.decode_eof(&mut buf)
            } else {
                codec.decode(&mut buf)
            };
            match r {
                Ok(Some(msg)) => handle(msg, &mut out),
                Ok(None) => break,
                Err(e) => {
                    out.decode_errors += 1;
                    if e.is_fatal() {
                        break 'feed;
                    }
                }
            }
        }
        if eof {
            break;
        }
    }
    out
}

fn check_yields(session: &[SentEpoch], out: &Outcome) -> Result<(), TestCaseError> {
    let mut last = 0;
    for c in &out.yielded {
        prop_assert!(c.epoch > last, "epochs out of order");
        last = c.epoch;
        let sent = session.iter().find(|e| e.epoch == c.epoch);
        prop_assert!(sent.is_some(), "epoch {} was never sent", c.epoch);
        let sent = sent.unwrap();
        let got: Vec<(u64, Vec<u8>)> = c.pages.iter().map(|p| (p.index, p.data.to_vec())).collect();
        prop_assert_eq!(&got, &sent.pages, "pages of epoch {} differ", c.epoch);
        prop_assert_eq!(&c.state, &Bytes::from(sent.state.clone()));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_streams_never_yield_a_wrong_epoch(
        session in session_strategy(),
        mutations in proptest::collection::vec(mutation_strategy(), 0..4),
        chunks in proptest::collection::vec(1usize..700, 1..8),
    ) {
        let frames = encode_session(&session);
        let bytes = apply(frames, &mutations);
        let (out, peak, largest) = measure(|| receive(&bytes, &chunks));
        check_yields(&session, &out)?;
        if mutations.is_empty() {
            prop_assert_eq!(out.yielded.len(), session.len());
            prop_assert_eq!(out.decode_errors + out.assemble_errors, 0);
        }
        // Whatever lengths the stream claims, memory is bounded by what actually arrived
        // and the frame cap (BytesMut may round a reservation up to 2x).
        let bound = 2 * (bytes.len() + HEADER_LEN + CAP as usize) + (64 << 10);
        prop_assert!(largest <= bound, "largest allocation {largest} > {bound}");
        prop_assert!(peak <= 4 * bound as isize, "peak {peak} > {}", 4 * bound);
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_overallocate(
        prefix in proptest::bool::ANY,
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        chunks in proptest::collection::vec(1usize..700, 1..8),
    ) {
        // Half the cases start with the magic so the header checks are exercised too.
        let mut input = if prefix { b"TWIN".to_vec() } else { Vec::new() };
        input.extend_from_slice(&bytes);
        let (out, _peak, largest) = measure(|| receive(&input, &chunks));
        prop_assert!(out.yielded.is_empty());
        prop_assert!(largest <= 2 * (input.len() + HEADER_LEN + CAP as usize));
    }

    #[test]
    fn assembler_continues_safely_after_message_level_faults(
        session in session_strategy(),
        ops in proptest::collection::vec((0u8..5, any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..5),
    ) {
        // Message-level mutations, with the assembler fed everything (no stop on error).
        let frames = encode_session(&session);
        let mut codec = FrameCodec::with_max_frame_len(CAP);
        let mut msgs: Vec<EpochMessage> = Vec::new();
        for f in frames {
            let mut b = BytesMut::from(&f[..]);
            if let Ok(em) = EpochMessage::try_from(codec.decode(&mut b).unwrap().unwrap()) {
                msgs.push(em);
            }
        }
        for (op, a, b) in &ops {
            if msgs.is_empty() {
                break;
            }
            let (a, b) = (a.index(msgs.len()), b.index(msgs.len()));
            match op {
                0 => { let m = msgs[a].clone(); msgs.insert(b, m); }
                1 => msgs.swap(a, b),
                2 => { msgs.remove(a); }
                3 => if let EpochMessage::Pages(p) = &mut msgs[a] {
                    if let Some(page) = p.pages.first_mut() {
                        let mut d = page.data.to_vec();
                        let at = b % d.len();
                        d[at] ^= 0x80;
                        page.data = Bytes::from(d);
                    }
                },
                _ => if let EpochMessage::State(s) = &mut msgs[a] {
                    let mut d = s.blob.to_vec();
                    d.push(0);
                    s.blob = Bytes::from(d);
                },
            }
        }
        let geometry = Geometry::new(PAGES * u64::from(PAGE_SIZE), PAGE_SIZE).unwrap();
        let mut asm = EpochAssembler::new(geometry, 1);
        let mut out = Outcome::default();
        for m in msgs {
            match asm.push(m) {
                Ok(Some(c)) => out.yielded.push(c),
                Ok(None) => {}
                Err(_) => out.assemble_errors += 1,
            }
        }
        check_yields(&session, &out)?;
        if ops.is_empty() {
            prop_assert_eq!(out.yielded.len(), session.len());
        }
    }
}

/// A frame with a valid header and CRC around an arbitrary payload.
fn framed(frame_type: u8, payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        frame_type,
        flags: 0,
        payload_len: payload.len() as u32,
        payload_crc: {
            let mut d = crc64fast::Digest::new();
            d.write(payload);
            d.sum64()
        },
    };
    let mut f = header.to_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    /// Past the frame checks: arbitrary payloads in well-formed frames of every type (and
    /// unknown ones) exercise the bincode and page-layout decoders and the assembler.
    #[test]
    fn arbitrary_payloads_in_valid_frames_never_panic_or_overallocate(
        frames in proptest::collection::vec(
            (0u8..20, proptest::collection::vec(any::<u8>(), 0..1200), any::<u32>(), any::<u32>()),
            1..12,
        ),
        chunks in proptest::collection::vec(1usize..700, 1..8),
    ) {
        let mut input = Vec::new();
        for (t, mut payload, a, b) in frames {
            // Give page frames a plausible prefix (page size, count) half of the time, so
            // the layout checks are reached with interesting values.
            if (t == 5 || t == 9 || t == 18) && a % 2 == 0 {
                let at = if t == 5 { 0 } else { 8 };
                payload.resize(payload.len().max(at + 8), 0);
                payload[at..at + 4].copy_from_slice(&(512u32 << (a % 4)).to_le_bytes());
                payload[at + 4..at + 8].copy_from_slice(&(b % 4).to_le_bytes());
            }
            input.extend_from_slice(&framed(t, &payload));
        }
        let (_out, _peak, largest) = measure(|| receive(&input, &chunks));
        prop_assert!(largest <= 2 * (input.len() + HEADER_LEN + CAP as usize));
    }
}
