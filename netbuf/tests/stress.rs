//! Concurrent push / seal / ack / output, as in the VMM: two "vCPU" threads push, a
//! "checkpoint" thread seals epochs, a "replication" thread acks them with some lag, and an
//! output thread takes released frames. Checked: every frame is released exactly once, in
//! push order per pusher, only after its epoch was acknowledged, and tagged with an epoch
//! not yet sealed when it was pushed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use twin_netbuf::{NetBuffer, NetBufferConfig, PushOutcome};

const PUSHERS: u32 = 2;
const FRAMES_PER_PUSHER: u32 = 20_000;

fn frame(pusher: u32, seq: u32) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&pusher.to_le_bytes());
    f.extend_from_slice(&seq.to_le_bytes());
    f
}

#[test]
fn concurrent_push_seal_ack_release() {
    let buffer = NetBuffer::new(NetBufferConfig {
        // Small enough that overflow happens now and then under this load.
        max_frames: 512,
        ..NetBufferConfig::default()
    });
    let sealed = Arc::new(AtomicU64::new(0));
    let done_pushing = Arc::new(AtomicBool::new(false));

    let output = {
        let buffer = buffer.clone();
        std::thread::spawn(move || {
            let mut got: Vec<(u32, u32, u64)> = Vec::new();
            while let Ok(frames) = buffer.wait_released(Duration::from_millis(50)) {
                // Acks only increase, so reading it after taking is an upper bound of the
                // ack that released these frames.
                let acked = buffer.stats().last_acked.unwrap_or(0);
                for f in frames {
                    assert!(
                        f.epoch <= acked,
                        "frame of epoch {} released before its ack ({acked})",
                        f.epoch
                    );
                    let pusher = u32::from_le_bytes(f.frame[12..16].try_into().unwrap());
                    let seq = u32::from_le_bytes(f.frame[16..20].try_into().unwrap());
                    got.push((pusher, seq, f.epoch));
                }
            }
            got
        })
    };

    let pushers: Vec<_> = (0..PUSHERS)
        .map(|p| {
            let sink = buffer.sink();
            let sealed = Arc::clone(&sealed);
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for seq in 0..FRAMES_PER_PUSHER {
                    let before = sealed.load(Ordering::Acquire);
                    match sink.push(&frame(p, seq)) {
                        PushOutcome::Held { epoch } => {
                            assert!(
                                epoch > before,
                                "pushed after seal({before}) but tagged {epoch}"
                            );
                            held.push(seq);
                        }
                        PushOutcome::Dropped(_) => {}
                        PushOutcome::Queued => panic!("never unprotected in this test"),
                    }
                    if seq % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
                held
            })
        })
        .collect();

    let checkpoint = {
        let buffer = buffer.clone();
        let sealed = Arc::clone(&sealed);
        let done = Arc::clone(&done_pushing);
        std::thread::spawn(move || {
            let mut epoch = 1;
            while !done.load(Ordering::Acquire) {
                buffer.seal(epoch).unwrap();
                sealed.store(epoch, Ordering::Release);
                epoch += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            // Seal the last open epoch once every push has returned.
            buffer.seal(epoch).unwrap();
            sealed.store(epoch, Ordering::Release);
            epoch
        })
    };

    let stop_acking = Arc::new(AtomicBool::new(false));
    let replication = {
        let buffer = buffer.clone();
        let sealed = Arc::clone(&sealed);
        let stop = Arc::clone(&stop_acking);
        std::thread::spawn(move || {
            // Ack with a lag of two epochs until told to stop.
            let mut acked = 0;
            while !stop.load(Ordering::Acquire) {
                let target = sealed.load(Ordering::Acquire).saturating_sub(2);
                if target > acked {
                    buffer.ack(target).unwrap();
                    acked = target;
                }
                std::thread::sleep(Duration::from_micros(300));
            }
        })
    };

    let held: Vec<Vec<u32>> = pushers.into_iter().map(|t| t.join().unwrap()).collect();
    done_pushing.store(true, Ordering::Release);
    let last = checkpoint.join().unwrap();
    // Ack the final epoch (a concurrent older ack from the replication thread is a no-op).
    buffer.ack(last).unwrap();
    stop_acking.store(true, Ordering::Release);
    replication.join().unwrap();
    buffer.close();
    let got = output.join().unwrap();

    // Exactly the accepted frames, each once, in push order per pusher.
    for (p, held) in held.iter().enumerate() {
        let released: Vec<u32> = got
            .iter()
            .filter(|(q, _, _)| *q == p as u32)
            .map(|(_, seq, _)| *seq)
            .collect();
        assert_eq!(&released, held, "pusher {p}");
    }
    let stats = buffer.stats();
    let accepted: usize = held.iter().map(Vec::len).sum();
    assert_eq!(stats.released_frames, accepted as u64);
    assert_eq!(
        stats.released_frames + stats.dropped_overflow_frames,
        u64::from(PUSHERS * FRAMES_PER_PUSHER)
    );
    assert_eq!(stats.held_frames + stats.queued_frames, 0);
    // Epoch tags never decrease along the release order.
    assert!(got.windows(2).all(|w| w[0].2 <= w[1].2));
    eprintln!(
        "released {} frames over {last} epochs, dropped {} for overflow, latency p50 {:?} p99 {:?} max {:?}",
        stats.released_frames,
        stats.dropped_overflow_frames,
        stats.latency.p50,
        stats.latency.p99,
        stats.latency.max
    );
}
