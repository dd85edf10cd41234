//! A whole session over an in-memory duplex pipe with `tokio_util::codec::Framed`: handshake,
//! VM description, initial sync, two epochs with acks, heartbeat, goodbye. Doubles as a
//! reference for the primary's and backup's loops.

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::Framed;
use twin_wire::handshake::{accept_hello, check_hello_reply};
use twin_wire::{
    AcceptPolicy, Ack, EpochAssembler, EpochBegin, EpochEncoder, EpochMessage, FrameCodec, Goodbye,
    GoodbyeReason, Heartbeat, Hello, Message, PageRef, Role, SyncDone, SyncPagesRef, SyncTracker,
    SyncZeroPages, VmDescription, VmId,
};

const PS: usize = 4096;
const PAGES: usize = 64;
const VM: VmId = VmId([0x42; 16]);

#[tokio::test]
async fn primary_and_backup_complete_a_session() {
    let (a, b) = tokio::io::duplex(1 << 20);

    let backup = tokio::spawn(async move {
        let mut io = Framed::new(b, FrameCodec::new());
        let Some(Ok(Message::Hello(hello))) = io.next().await else {
            panic!("no hello");
        };
        let policy = AcceptPolicy {
            vm_id: None,
            min_generation: 0,
        };
        let ack = accept_hello(&policy, &hello).expect("accepted");
        io.send(Message::HelloAck(ack)).await.unwrap();
        let Some(Ok(Message::VmDescription(desc))) = io.next().await else {
            panic!("no description");
        };
        let geometry = desc.geometry().unwrap();
        let mut replica = vec![0u8; geometry.mem_size() as usize];
        let mut sync = SyncTracker::new(geometry);
        let mut asm = EpochAssembler::new(geometry, 1);
        let mut heartbeats = 0;
        while let Some(msg) = io.next().await {
            let msg = match EpochMessage::try_from(msg.unwrap()) {
                Ok(em) => {
                    if let Some(done) = asm.push(em).expect("valid epoch") {
                        for p in &done.pages {
                            let at = p.index as usize * PS;
                            replica[at..at + PS].copy_from_slice(&p.data);
                        }
                        io.send(Message::Ack(Ack { epoch: done.epoch }))
                            .await
                            .unwrap();
                    }
                    continue;
                }
                Err(other) => other,
            };
            match msg {
                Message::SyncPages(batch) => {
                    sync.pages(&batch).unwrap();
                    for p in &batch.pages {
                        let at = p.index as usize * PS;
                        replica[at..at + PS].copy_from_slice(&p.data);
                    }
                }
                Message::SyncZeroPages(z) => sync.zero_pages(&z).unwrap(),
                Message::SyncDone(d) => sync.done(&d).unwrap(),
                Message::Heartbeat(_) => heartbeats += 1,
                Message::Goodbye(_) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        (replica, asm.next_epoch(), heartbeats)
    });

    // ---- primary ----
    let mut io = Framed::new(a, FrameCodec::new());
    let hello = Hello::new(Role::Primary, VM, 1);
    io.send(Message::Hello(hello.clone())).await.unwrap();
    let reply = io.next().await.unwrap().unwrap();
    check_hello_reply(&hello, reply).expect("handshake");
    io.send(Message::VmDescription(VmDescription {
        mem_size: (PAGES * PS) as u64,
        page_size: PS as u32,
        vcpus: 1,
        mac: [2, 0, 0, 0, 0, 1],
        config: vec![],
        disks: Vec::new(),
    }))
    .await
    .unwrap();

    let mut mem = vec![0u8; PAGES * PS];
    for (i, b) in mem.iter_mut().enumerate().take(PAGES / 2 * PS) {
        *b = (i % 251) as u8;
    }
    // Initial sync: non-zero pages as data, the rest as zero indices.
    let refs: Vec<PageRef<'_>> = (0..PAGES / 2)
        .map(|i| PageRef {
            index: i as u64,
            data: &mem[i * PS..(i + 1) * PS],
        })
        .collect();
    io.send(SyncPagesRef {
        page_size: PS as u32,
        pages: &refs,
    })
    .await
    .unwrap();
    io.send(Message::SyncZeroPages(SyncZeroPages {
        indices: (PAGES as u64 / 2..PAGES as u64).collect(),
    }))
    .await
    .unwrap();
    io.send(Message::SyncDone(SyncDone {
        pages_sent: PAGES as u64,
        disk_bytes_sent: 0,
    }))
    .await
    .unwrap();

    let codec = FrameCodec::new();
    for epoch in 1..=2u64 {
        // The guest dirties a few pages.
        let dirty = [epoch as usize, 40 + epoch as usize];
        for &d in &dirty {
            mem[d * PS..(d + 1) * PS].fill(epoch as u8 + 100);
        }
        let state = vec![epoch as u8; 100];
        let refs: Vec<PageRef<'_>> = dirty
            .iter()
            .map(|&d| PageRef {
                index: d as u64,
                data: &mem[d * PS..(d + 1) * PS],
            })
            .collect();
        let mut buf = BytesMut::new();
        let mut enc = EpochEncoder::begin(
            codec,
            EpochBegin {
                epoch,
                page_count: refs.len() as u64,
                state_len: state.len() as u64,
            },
            PS as u32,
            &mut buf,
        )
        .unwrap();
        enc.pages(&refs, &mut buf).unwrap();
        enc.state(&state, &mut buf).unwrap();
        enc.end(&mut buf).unwrap();
        // The epoch's frames are already encoded: write them as they are, bypassing the
        // Framed sink (whose buffer is empty: every `send` above flushed it).
        io.get_mut()
            .write_all_buf(&mut buf)
            .await
            .expect("write epoch");
        io.send(Message::Heartbeat(Heartbeat {
            seq: epoch,
            sent_at_ns: 0,
            last_epoch: epoch,
        }))
        .await
        .unwrap();
        let Some(Ok(Message::Ack(ack))) = io.next().await else {
            panic!("no ack");
        };
        assert_eq!(ack.epoch, epoch);
    }
    io.send(Message::Goodbye(Goodbye::new(
        GoodbyeReason::Stopping,
        "test done",
    )))
    .await
    .unwrap();

    let (replica, next, heartbeats) = backup.await.unwrap();
    assert_eq!(next, 3);
    assert_eq!(heartbeats, 2);
    assert!(replica == mem, "replica differs from primary memory");
}
