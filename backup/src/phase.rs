//! Where a session with a primary stands, and the one function that moves it on a message.
//!
//! Pure: it says what to do with the replica ([`Step`]) and leaves doing it to the caller,
//! so that the order the protocol demands (description, sync, then epochs; nothing after a
//! goodbye) is unit-tested without a network or a VM. A session starts in
//! [`Phase::AwaitDescription`] only once its `Hello` was accepted.

use twin_wire::{
    AssembleError, BasePages, CompleteEpoch, EpochAssembler, EpochMessage, FrameType, Geometry,
    GeometryError, GoodbyeReason, Inbound, Message, SyncDisk, SyncError, SyncPages, SyncTracker,
    SyncZeroPages, VmDescription,
};

/// A session's phase.
#[derive(Debug)]
pub enum Phase {
    /// `Hello` accepted; the VM's description comes next.
    AwaitDescription,
    /// Initial sync into the replica.
    Syncing {
        geometry: Geometry,
        tracker: SyncTracker,
        /// The VM's disks (their sizes) and the disk bytes synced so far.
        disks: Vec<u64>,
        disk_bytes: u64,
    },
    /// Epochs; the assembler exists from the first `EpochBegin` on.
    Replicating {
        geometry: Geometry,
        disks: Vec<u64>,
        assembler: Option<EpochAssembler>,
    },
}

/// What the caller does with the replica after a message.
#[derive(Debug)]
pub enum Step {
    /// Nothing (a heartbeat, an epoch message short of its end).
    None,
    /// (Re)build the replica for this VM.
    Describe(VmDescription),
    /// Write these sync pages (indices checked).
    SyncPages(SyncPages),
    /// Zero these pages (indices checked).
    SyncZeroPages(SyncZeroPages),
    /// Write this disk data (disk and range checked).
    SyncDisk(SyncDisk),
    /// Every page of the sync arrived.
    SyncDone,
    /// Apply and acknowledge a whole, verified epoch.
    Commit(CompleteEpoch),
    /// Keep a frame the primary's guest received (see `crate::inbound`).
    Inbound(Inbound),
}

/// Why a session cannot go on (as the primary's messages make it end).
#[derive(Debug, thiserror::Error)]
pub enum PhaseEnd {
    #[error("the primary said goodbye ({reason}): {detail}")]
    Goodbye {
        reason: GoodbyeReason,
        detail: String,
    },
    #[error("protocol violation: {what} while {phase}")]
    Unexpected { what: String, phase: &'static str },
    #[error("bad VM description")]
    Description(#[source] GeometryError),
    #[error("page size {0} is not this backup's {1}")]
    PageSize(u32, u32),
    #[error("initial sync")]
    Sync(#[source] SyncError),
    #[error("initial sync of the disks: {0}")]
    DiskSync(String),
    #[error("rejected epoch")]
    Epoch(#[source] AssembleError),
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::AwaitDescription => "awaiting the VM description",
            Phase::Syncing { .. } => "syncing",
            Phase::Replicating { .. } => "replicating",
        }
    }

    /// [`Phase::on_with`] without a replica to decode delta pages against (a delta page
    /// then ends the session).
    #[cfg(test)]
    pub fn on(self, msg: Message, page_size: u32) -> Result<(Phase, Step), PhaseEnd> {
        struct NoReplica;
        impl BasePages for NoReplica {
            fn read_committed_page(&self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
                Err(std::io::Error::other("no replica"))
            }
        }
        self.on_with(msg, page_size, &NoReplica)
    }

    /// The one transition function: `msg` arrives in this phase; `page_size` is the only one
    /// this backup replicates; `base` is the replica as of its last committed epoch, which
    /// delta pages are decoded against (read only).
    pub fn on_with(
        self,
        msg: Message,
        page_size: u32,
        base: &dyn BasePages,
    ) -> Result<(Phase, Step), PhaseEnd> {
        let unexpected = |phase: &Phase, t: FrameType| PhaseEnd::Unexpected {
            what: format!("{t:?}"),
            phase: phase.name(),
        };
        match (self, msg) {
            // Either side may say goodbye or send a heartbeat at any time.
            (_, Message::Goodbye(g)) => Err(PhaseEnd::Goodbye {
                reason: g.reason,
                detail: g.detail,
            }),
            (p, Message::Heartbeat(_)) => Ok((p, Step::None)),
            // Between epochs (the primary writes each epoch with one write).
            (p @ Phase::Replicating { .. }, Message::Inbound(i)) => Ok((p, Step::Inbound(i))),
            (Phase::AwaitDescription, Message::VmDescription(d)) => {
                let geometry = d.geometry().map_err(PhaseEnd::Description)?;
                if d.page_size != page_size {
                    return Err(PhaseEnd::PageSize(d.page_size, page_size));
                }
                let tracker = SyncTracker::new(geometry);
                Ok((
                    Phase::Syncing {
                        geometry,
                        tracker,
                        disks: d.disks.clone(),
                        disk_bytes: 0,
                    },
                    Step::Describe(d),
                ))
            }
            (
                Phase::Syncing {
                    geometry,
                    mut tracker,
                    disks,
                    mut disk_bytes,
                },
                msg,
            ) => {
                let step = match msg {
                    Message::SyncPages(p) => {
                        tracker.pages(&p).map_err(PhaseEnd::Sync)?;
                        Step::SyncPages(p)
                    }
                    Message::SyncZeroPages(z) => {
                        tracker.zero_pages(&z).map_err(PhaseEnd::Sync)?;
                        Step::SyncZeroPages(z)
                    }
                    Message::SyncDisk(d) => {
                        let Some(&cap) = disks.get(d.disk as usize) else {
                            return Err(PhaseEnd::DiskSync(format!(
                                "data for disk {}, the VM has {}",
                                d.disk,
                                disks.len()
                            )));
                        };
                        let len = d.data.len() as u64;
                        if d.offset.checked_add(len).is_none_or(|end| end > cap) {
                            return Err(PhaseEnd::DiskSync(format!(
                                "{len} bytes at {} are outside disk {} ({cap} bytes)",
                                d.offset, d.disk
                            )));
                        }
                        disk_bytes += len;
                        Step::SyncDisk(d)
                    }
                    Message::SyncDone(done) => {
                        tracker.done(&done).map_err(PhaseEnd::Sync)?;
                        if done.disk_bytes_sent != disk_bytes {
                            return Err(PhaseEnd::DiskSync(format!(
                                "{} bytes of disk data sent, {disk_bytes} received",
                                done.disk_bytes_sent
                            )));
                        }
                        return Ok((
                            Phase::Replicating {
                                geometry,
                                disks,
                                assembler: None,
                            },
                            Step::SyncDone,
                        ));
                    }
                    other => {
                        let p = Phase::Syncing {
                            geometry,
                            tracker,
                            disks,
                            disk_bytes,
                        };
                        return Err(unexpected(&p, other.frame_type()));
                    }
                };
                Ok((
                    Phase::Syncing {
                        geometry,
                        tracker,
                        disks,
                        disk_bytes,
                    },
                    step,
                ))
            }
            (
                Phase::Replicating {
                    geometry,
                    disks,
                    assembler,
                },
                msg,
            ) => {
                let t = msg.frame_type();
                let Ok(em) = EpochMessage::try_from(msg) else {
                    let p = Phase::Replicating {
                        geometry,
                        disks,
                        assembler,
                    };
                    return Err(unexpected(&p, t));
                };
                let mut asm = assembler.unwrap_or_else(|| {
                    EpochAssembler::new(geometry, em.epoch()).with_disks(disks.clone())
                });
                let step = match asm.push_with(em, base).map_err(PhaseEnd::Epoch)? {
                    Some(complete) => Step::Commit(complete),
                    None => Step::None,
                };
                Ok((
                    Phase::Replicating {
                        geometry,
                        disks,
                        assembler: Some(asm),
                    },
                    step,
                ))
            }
            (p, other) => Err(unexpected(&p, other.frame_type())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Bytes, BytesMut};
    use tokio_util::codec::Decoder;
    use twin_wire::{
        EpochBegin, EpochEncoder, FrameCodec, Goodbye, Heartbeat, Hello, Page, PageRef, Role,
        SyncDone, VmId,
    };

    const PS: u32 = 4096;

    fn desc(pages: u64) -> Message {
        Message::VmDescription(VmDescription {
            mem_size: pages * u64::from(PS),
            page_size: PS,
            vcpus: 1,
            mac: [2, 0, 0, 0, 0, 1],
            config: Vec::new(),
            disks: Vec::new(),
        })
    }

    fn sync_pages(indices: &[u64]) -> Message {
        Message::SyncPages(SyncPages {
            page_size: PS,
            pages: indices
                .iter()
                .map(|&index| Page {
                    index,
                    data: Bytes::from(vec![index as u8; PS as usize]),
                })
                .collect(),
        })
    }

    /// The frames of one whole epoch, decoded back into messages.
    fn epoch(n: u64, pages: &[u64]) -> Vec<Message> {
        let data: Vec<Vec<u8>> = pages.iter().map(|&p| vec![p as u8 ^ 0x5a; 4096]).collect();
        let refs: Vec<PageRef<'_>> = pages
            .iter()
            .zip(&data)
            .map(|(&index, d)| PageRef { index, data: d })
            .collect();
        let state = b"state".to_vec();
        let mut buf = BytesMut::new();
        let codec = FrameCodec::new();
        let begin = EpochBegin {
            epoch: n,
            page_count: refs.len() as u64,
            state_len: state.len() as u64,
        };
        let mut enc = EpochEncoder::begin(codec, begin, PS, &mut buf).unwrap();
        enc.pages(&refs, &mut buf).unwrap();
        enc.state(&state, &mut buf).unwrap();
        enc.end(&mut buf).unwrap();
        let mut c = FrameCodec::new();
        let mut out = Vec::new();
        while let Some(m) = c.decode(&mut buf).unwrap() {
            out.push(m);
        }
        out
    }

    fn run(msgs: Vec<Message>) -> (Result<Phase, PhaseEnd>, Vec<&'static str>) {
        let mut phase = Phase::AwaitDescription;
        let mut steps = Vec::new();
        for m in msgs {
            match phase.on(m, PS) {
                Ok((p, s)) => {
                    steps.push(match s {
                        Step::None => "none",
                        Step::Describe(_) => "describe",
                        Step::SyncPages(_) => "pages",
                        Step::SyncZeroPages(_) => "zero",
                        Step::SyncDisk(_) => "disk",
                        Step::SyncDone => "synced",
                        Step::Commit(_) => "commit",
                        Step::Inbound(_) => "inbound",
                    });
                    phase = p;
                }
                Err(e) => return (Err(e), steps),
            }
        }
        (Ok(phase), steps)
    }

    fn disk_desc(pages: u64, disks: Vec<u64>) -> Message {
        let Message::VmDescription(mut d) = desc(pages) else {
            unreachable!()
        };
        d.disks = disks;
        Message::VmDescription(d)
    }

    fn sync_disk(disk: u32, offset: u64, len: usize) -> Message {
        Message::SyncDisk(twin_wire::SyncDisk {
            disk,
            offset,
            data: Bytes::from(vec![1u8; len]),
        })
    }

    fn done(pages: u64, disk_bytes: u64) -> Message {
        Message::SyncDone(SyncDone {
            pages_sent: pages,
            disk_bytes_sent: disk_bytes,
        })
    }

    #[test]
    fn disk_sync_is_checked_against_the_description() {
        let (end, steps) = run(vec![
            disk_desc(1, vec![8192, 4096]),
            sync_pages(&[0]),
            sync_disk(0, 4096, 4096),
            sync_disk(1, 0, 512),
            done(1, 4608),
        ]);
        assert!(
            matches!(end, Ok(Phase::Replicating { .. })),
            "{:?}",
            end.err()
        );
        assert_eq!(steps, ["describe", "pages", "disk", "disk", "synced"]);
        for (bad, why) in [
            (sync_disk(2, 0, 512), "data for disk 2, the VM has 2"),
            (sync_disk(1, 4096, 512), "outside disk 1"),
            (sync_disk(0, u64::MAX - 511, 512), "outside disk 0"),
        ] {
            let (end, _) = run(vec![disk_desc(1, vec![8192, 4096]), bad]);
            let e = end.expect_err("refused");
            assert!(e.to_string().contains(why), "{e}");
        }
        // A lost SyncDisk: the byte count does not add up.
        let (end, _) = run(vec![
            disk_desc(1, vec![8192]),
            sync_pages(&[0]),
            sync_disk(0, 0, 512),
            done(1, 1024),
        ]);
        let e = end.expect_err("refused");
        assert!(
            e.to_string()
                .contains("1024 bytes of disk data sent, 512 received"),
            "{e}"
        );
    }

    #[test]
    fn a_whole_session_in_order() {
        let mut msgs = vec![
            desc(4),
            Message::Heartbeat(Heartbeat {
                seq: 1,
                sent_at_ns: 1,
                last_epoch: 0,
            }),
            sync_pages(&[0, 1]),
            Message::SyncZeroPages(SyncZeroPages {
                indices: vec![2, 3],
            }),
            Message::SyncDone(SyncDone {
                pages_sent: 4,
                disk_bytes_sent: 0,
            }),
        ];
        msgs.extend(epoch(7, &[1, 3]));
        msgs.extend(epoch(8, &[]));
        let (end, steps) = run(msgs);
        assert!(
            matches!(end, Ok(Phase::Replicating { .. })),
            "{:?}",
            end.err()
        );
        assert_eq!(
            steps,
            [
                "describe", "none", "pages", "zero", "synced", "none", "none", "none", "commit",
                "none", "none", "commit"
            ]
        );
    }

    #[test]
    fn inbound_frames_are_taken_between_epochs_only() {
        let inbound = || {
            Message::Inbound(twin_wire::Inbound {
                epoch: 8,
                frame: vec![0; 60],
            })
        };
        let sync = vec![
            desc(2),
            sync_pages(&[0, 1]),
            Message::SyncDone(SyncDone {
                pages_sent: 2,
                disk_bytes_sent: 0,
            }),
        ];
        let mut msgs = sync.clone();
        msgs.extend(epoch(7, &[1]));
        msgs.push(inbound());
        msgs.extend(epoch(8, &[]));
        let (end, steps) = run(msgs);
        assert!(end.is_ok(), "{:?}", end.err());
        assert_eq!(steps.iter().filter(|s| **s == "inbound").count(), 1);
        assert_eq!(steps.iter().filter(|s| **s == "commit").count(), 2);
        // While syncing it is a protocol violation.
        let (end, _) = run(vec![desc(2), inbound()]);
        assert!(matches!(end, Err(PhaseEnd::Unexpected { .. })));
    }

    #[test]
    fn out_of_order_messages_end_the_session() {
        // Epoch before the description, sync before the description, a second description,
        // an epoch before SyncDone, sync after it, a Hello or an Ack in the session.
        let hello = Message::Hello(Hello::new(Role::Primary, VmId([1; 16]), 1));
        let cases: Vec<(Vec<Message>, &str)> = vec![
            (epoch(1, &[0]), "VmDescription first"),
            (vec![sync_pages(&[0])], "sync before description"),
            (vec![desc(4), desc(4)], "second description"),
            (
                [vec![desc(4), sync_pages(&[0])], epoch(1, &[0])].concat(),
                "epoch before SyncDone",
            ),
            (
                vec![
                    desc(1),
                    sync_pages(&[0]),
                    Message::SyncDone(SyncDone {
                        pages_sent: 1,
                        disk_bytes_sent: 0,
                    }),
                    sync_pages(&[0]),
                ],
                "sync after SyncDone",
            ),
            (vec![hello.clone()], "Hello in a session"),
            (vec![desc(4), hello], "Hello while syncing"),
            (
                vec![desc(4), Message::Ack(twin_wire::Ack { epoch: 1 })],
                "Ack from a primary",
            ),
        ];
        for (msgs, what) in cases {
            let (end, _) = run(msgs);
            assert!(
                matches!(end, Err(PhaseEnd::Unexpected { .. })),
                "{what}: {:?}",
                end.map(|p| p.name())
            );
        }
    }

    #[test]
    fn bad_description_sync_and_epochs_are_typed() {
        let (end, _) = run(vec![Message::VmDescription(VmDescription {
            mem_size: 4096,
            page_size: 8192,
            vcpus: 1,
            mac: [0; 6],
            config: vec![],
            disks: Vec::new(),
        })]);
        assert!(matches!(end, Err(PhaseEnd::Description(_))));
        let (end, _) = run(vec![Message::VmDescription(VmDescription {
            mem_size: 8192,
            page_size: 8192,
            vcpus: 1,
            mac: [0; 6],
            config: vec![],
            disks: Vec::new(),
        })]);
        assert!(matches!(end, Err(PhaseEnd::PageSize(8192, 4096))));
        let (end, _) = run(vec![desc(2), sync_pages(&[5])]);
        assert!(matches!(end, Err(PhaseEnd::Sync(_))));
        let (end, _) = run(vec![
            desc(2),
            sync_pages(&[0]),
            Message::SyncDone(SyncDone {
                pages_sent: 1,
                disk_bytes_sent: 0,
            }),
        ]);
        assert!(
            matches!(end, Err(PhaseEnd::Sync(_))),
            "a page was never sent"
        );
        // A gap in the epoch numbers.
        let mut msgs = vec![
            desc(1),
            sync_pages(&[0]),
            Message::SyncDone(SyncDone {
                pages_sent: 1,
                disk_bytes_sent: 0,
            }),
        ];
        msgs.extend(epoch(3, &[0]));
        msgs.extend(epoch(5, &[0]));
        let (end, steps) = run(msgs);
        assert!(matches!(end, Err(PhaseEnd::Epoch(_))));
        assert_eq!(steps.iter().filter(|s| **s == "commit").count(), 1);
    }

    #[test]
    fn goodbye_ends_every_phase_with_its_reason() {
        let bye = || Message::Goodbye(Goodbye::new(GoodbyeReason::Handover, "tap gone"));
        for prefix in [
            vec![],
            vec![desc(1)],
            vec![
                desc(1),
                sync_pages(&[0]),
                Message::SyncDone(SyncDone {
                    pages_sent: 1,
                    disk_bytes_sent: 0,
                }),
            ],
        ] {
            let mut msgs = prefix;
            msgs.push(bye());
            let (end, _) = run(msgs);
            assert!(matches!(
                end,
                Err(PhaseEnd::Goodbye {
                    reason: GoodbyeReason::Handover,
                    ..
                })
            ));
        }
    }

    /// The epochs of a session as the primary sends them with compression on: page 1 as a
    /// delta against what it sent before, page 2 LZ4. `corrupt` flips a byte of the delta.
    fn delta_epoch(n: u64, base: &[u8], page: &[u8], corrupt: bool) -> Vec<Message> {
        use twin_wire::pagecodec::{encode_lz4, encode_xor_lz4, max_lz4_len};
        use twin_wire::{EncodedPageRef, PageEncoding};
        let mut scratch = vec![0; PS as usize];
        let mut delta = vec![0; max_lz4_len(PS as usize)];
        let dn = encode_xor_lz4(page, base, &mut scratch, &mut delta).expect("a small delta");
        delta.truncate(dn);
        if corrupt {
            // A literal of the changed bytes: decodes, to the wrong page.
            delta[dn - 3] ^= 0x40;
        }
        let zero = vec![0u8; PS as usize];
        let mut lz4 = vec![0; max_lz4_len(PS as usize)];
        let ln = encode_lz4(&zero, &mut lz4).unwrap();
        let refs = [
            EncodedPageRef {
                index: 1,
                encoding: PageEncoding::XorLz4,
                data: &delta,
                raw: page,
            },
            EncodedPageRef {
                index: 2,
                encoding: PageEncoding::Lz4,
                data: &lz4[..ln],
                raw: &zero,
            },
        ];
        let mut buf = BytesMut::new();
        let begin = EpochBegin {
            epoch: n,
            page_count: 2,
            state_len: 1,
        };
        let mut enc = EpochEncoder::begin(FrameCodec::new(), begin, PS, &mut buf).unwrap();
        enc.compressed_pages(&refs, &mut buf).unwrap();
        enc.state(b"s", &mut buf).unwrap();
        enc.end(&mut buf).unwrap();
        let mut c = FrameCodec::new();
        let mut out = Vec::new();
        while let Some(m) = c.decode(&mut buf).unwrap() {
            out.push(m);
        }
        out
    }

    /// Drives a real replica as the backup's session loop does (pages written only at a
    /// commit). Returns how the session ended, if it did.
    fn drive(
        r: &crate::replica::Replica,
        msgs: Vec<Message>,
        phase: &mut Option<Phase>,
    ) -> Option<PhaseEnd> {
        for m in msgs {
            match phase.take().unwrap().on_with(m, PS, r) {
                Ok((p, step)) => {
                    match step {
                        Step::SyncPages(s) => s.pages.iter().for_each(|p| {
                            r.memory.write_page(p.index, &p.data, 0).unwrap();
                        }),
                        Step::Commit(c) => c.pages.iter().for_each(|p| {
                            r.memory.write_page(p.index, &p.data, c.epoch).unwrap();
                        }),
                        _ => {}
                    }
                    *phase = Some(p);
                }
                Err(e) => return Some(e),
            }
        }
        None
    }

    /// Every page of the replica, as committed.
    fn replica_bytes(r: &crate::replica::Replica) -> Vec<u8> {
        let mut out = vec![0u8; (r.memory.size()) as usize];
        for (i, page) in out.chunks_mut(PS as usize).enumerate() {
            r.memory.read_committed_page(i as u64, page).unwrap();
        }
        out
    }

    #[test]
    fn deltas_decode_against_the_replica_and_a_corrupt_one_leaves_it_untouched() {
        deltas_against(crate::replica::ReplicaMemory::Ram(
            twin_vmm::memory::Memory::new(2 << 20).unwrap(),
        ));
    }

    /// The same with the replica's memory in a replica store on disk.
    #[test]
    fn deltas_decode_against_a_replica_store_and_a_corrupt_one_leaves_it_untouched() {
        let dir = std::env::temp_dir().join(format!("twin-phase-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        deltas_against(crate::replica::ReplicaMemory::Store(
            twin_store::Store::create(&dir, 2 << 20, None).unwrap(),
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn deltas_against(memory: crate::replica::ReplicaMemory) {
        let r = crate::replica::Replica {
            memory,
            disks: Vec::new(),
            vm_id: VmId([1; 16]),
            generation: 1,
            committed: None,
            mac: [0; 6],
            inbound: Default::default(),
        };
        let mut phase = Some(Phase::AwaitDescription);
        // Sync: page 1 holds 0x01 bytes, pages from 4 on are zero.
        let zero = Message::SyncZeroPages(SyncZeroPages {
            indices: (4..512).collect(),
        });
        let end = drive(
            &r,
            vec![desc(512), sync_pages(&[0, 1, 2, 3]), zero, done(512, 0)],
            &mut phase,
        );
        assert!(end.is_none(), "{end:?}");
        let synced = vec![1u8; PS as usize];
        let mut v1 = synced.clone();
        v1[100..600].fill(0xee);
        assert!(drive(&r, delta_epoch(1, &synced, &v1, false), &mut phase).is_none());
        let mut got = vec![0; PS as usize];
        r.memory.read_committed_page(1, &mut got).unwrap();
        assert_eq!(got, v1, "the delta applied to the synced page");
        let before = replica_bytes(&r);
        let mut v2 = v1.clone();
        v2[2000..2100].fill(0x11);
        let end = drive(&r, delta_epoch(2, &v1, &v2, true), &mut phase);
        assert!(
            matches!(
                end,
                Some(PhaseEnd::Epoch(AssembleError::Checksum { epoch: 2, .. }))
            ),
            "{end:?}"
        );
        assert!(replica_bytes(&r) == before, "the replica is untouched");
    }
}
