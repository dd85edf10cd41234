//! Micro-benchmark of the checkpoint hot path: encode an epoch of 4 KiB pages straight from
//! a "guest memory" buffer (EpochEncoder), then decode and assemble it (FrameCodec +
//! EpochAssembler). Prints throughput; asserts nothing about time.
//!
//! `cargo run --release -p twin-wire --example codec_throughput [dirty_pages] [batch]`

use bytes::BytesMut;
use std::time::{Duration, Instant};
use tokio_util::codec::Decoder;
use twin_wire::{
    EpochAssembler, EpochBegin, EpochEncoder, EpochMessage, FrameCodec, Geometry, PageRef,
};

const PAGE: usize = 4096;
const MEM: usize = 256 << 20;

fn main() {
    let mut args = std::env::args().skip(1);
    let dirty: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16384);
    let batch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let pages_in_mem = MEM / PAGE;
    let dirty = dirty.min(pages_in_mem);

    // Pseudo-random guest memory and a pseudo-random dirty set (xorshift, no deps).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mem: Vec<u8> = (0..MEM / 8).flat_map(|_| next().to_le_bytes()).collect();
    let mut indices: Vec<u64> = (0..pages_in_mem as u64).collect();
    for i in (1..indices.len()).rev() {
        indices.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    indices.truncate(dirty);
    indices.sort_unstable();
    let state = vec![0x5au8; 64 << 10];

    let codec = FrameCodec::new();
    let geometry = Geometry::new(MEM as u64, PAGE as u32).expect("geometry");
    let payload_bytes = (dirty * PAGE + state.len()) as f64;
    let mut out = BytesMut::with_capacity(dirty * (PAGE + 16) + (1 << 20));
    let (mut enc_t, mut dec_t) = (Duration::ZERO, Duration::ZERO);
    let rounds = 20u64;
    let mut wire_len = 0;

    for round in 0..rounds + 2 {
        let epoch = round + 1;
        // ---- encode ----
        out.clear();
        let t = Instant::now();
        let refs: Vec<PageRef<'_>> = indices
            .iter()
            .map(|&i| PageRef {
                index: i,
                data: &mem[i as usize * PAGE..][..PAGE],
            })
            .collect();
        let mut enc = EpochEncoder::begin(
            codec,
            EpochBegin {
                epoch,
                page_count: dirty as u64,
                state_len: state.len() as u64,
            },
            PAGE as u32,
            &mut out,
        )
        .expect("begin");
        for chunk in refs.chunks(batch) {
            enc.pages(chunk, &mut out).expect("pages");
        }
        enc.state(&state, &mut out).expect("state");
        enc.end(&mut out).expect("end");
        let e = t.elapsed();
        wire_len = out.len();

        // ---- decode + assemble (the receive buffer copy stands in for the socket read) ----
        let mut rx = BytesMut::from(&out[..]);
        let mut asm = EpochAssembler::new(geometry, epoch);
        let mut dec = codec;
        let t = Instant::now();
        let mut complete = None;
        while let Some(msg) = dec.decode(&mut rx).expect("decode") {
            let msg = EpochMessage::try_from(msg).expect("epoch message");
            if let Some(c) = asm.push(msg).expect("assemble") {
                complete = Some(c);
            }
        }
        let d = t.elapsed();
        let c = complete.expect("epoch completed");
        assert_eq!(c.pages.len(), dirty);
        if round >= 2 {
            // The first two rounds warm caches and the allocator.
            enc_t += e;
            dec_t += d;
        }
    }
    let gbs = |t: Duration| payload_bytes * rounds as f64 / t.as_secs_f64() / 1e9;
    println!(
        "{dirty} dirty pages of {PAGE} B + {} KiB state per epoch, batches of {batch}, {} B on the wire ({:.2}% overhead)",
        state.len() >> 10,
        wire_len,
        (wire_len as f64 / payload_bytes - 1.0) * 100.0
    );
    println!(
        "encode (copy + frame CRC + epoch checksum):   {:6.2} GB/s",
        gbs(enc_t)
    );
    println!(
        "decode + assemble (CRC + checks + checksum):  {:6.2} GB/s",
        gbs(dec_t)
    );
    println!(
        "encode then decode, one core:                 {:6.2} GB/s",
        gbs(enc_t + dec_t)
    );
}
