//! No split brain: a real etcd arbiter decides who owns the VM when primary and backup lose
//! each other, and the loser fences. Every partition here is real (nftables drops or links
//! down between namespaces), both hosts live, and what matters is counted where the world
//! sees it: the frames each host's VM sends out of its TAP once both sides have decided.
//! At most one of them may send any, and no INCR the client saw acknowledged may be lost.

use std::time::{Duration, Instant};

use twin_api::{Decision, EventKind};
use twin_lab::events::Events;
use twin_lab::rig::*;
use twin_lab::*;

/// Frames the VM on the host of `ns` has sent into the world (its TAP's receive counter:
/// what the VMM writes into a TAP, the kernel receives).
fn frames_out(ns: &Netns) -> u64 {
    let json = ns
        .run(&["ip", "-s", "-j", "link", "show", "dev", TAP])
        .expect("ip -s link");
    let v: serde_json::Value = serde_json::from_str(&json).expect("ip's JSON");
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .expect("rx packets")
}

/// Frames sent by each host's VM over `window`.
fn frames_during(rig: &Rig, window: Duration) -> (u64, u64) {
    let (p0, b0) = (
        frames_out(&rig.ha.primary.ns),
        frames_out(&rig.ha.backup.ns),
    );
    std::thread::sleep(window);
    let (p1, b1) = (
        frames_out(&rig.ha.primary.ns),
        frames_out(&rig.ha.backup.ns),
    );
    (p1 - p0, b1 - b0)
}

/// A protected VM with a real etcd arbiter, its client's stream flowing.
fn start_with_arbiter(rep: &mut Report) -> Rig {
    let rig = Rig::start(
        rep,
        Opts {
            arbiter: true,
            ..Opts::default()
        },
    );
    rig.wait_stream(Instant::now(), "protected stream");
    rig
}

/// The backup's claim goes unanswered, and `hold` later it still has not taken over.
fn no_takeover_without_the_arbiter(be: &Events, bmark: u64, hold: Duration) {
    be.wait(
        bmark,
        "an unanswered claim",
        Duration::from_secs(30),
        |e| matches!(&e.kind, EventKind::Arbitrated { outcome, .. } if outcome == "unreachable"),
    )
    .expect("the backup asks the arbiter and gets no answer");
    std::thread::sleep(hold);
    assert!(
        !be.all(bmark, false)
            .expect("events")
            .iter()
            .any(|e| matches!(e.kind, EventKind::FailoverStarted { .. })),
        "the backup took over without the arbiter's grant"
    );
}

/// Waits until the backup has taken over.
fn wait_takeover(be: &Events, bmark: u64, why: &str) {
    be.wait(bmark, "the takeover", Duration::from_secs(60), |e| {
        matches!(e.kind, EventKind::FailoverComplete(_))
    })
    .expect(why);
}

/// The end of a failover the arbiter held up: the backup takes over (`why` names the
/// expectation), the client's stream resumes on it and is intact, nothing panicked.
fn took_over_once_it_answers(
    rep: &mut Report,
    rig: &mut Rig,
    (be, bmark): (&Events, u64),
    died: Instant,
    why: &str,
) {
    wait_takeover(be, bmark, why);
    rep.note(format!(
        "took over {:.1}s after the kill",
        died.elapsed().as_secs_f64()
    ));
    rig.wait_stream(died, "the client's stream resumes on the backup");
    rig.finish_and_check(rep, died, "backup");
    rig.assert_no_panics();
}

/// How the two sides ended up.
#[derive(Debug)]
enum Winner {
    /// The backup won the claim and runs the VM; the primary stood down or holds.
    Backup,
    /// The primary won and runs on; the backup detached.
    Primary,
}

/// Waits until the arbiter's decision has played out on both sides.
fn settle(
    rig: &Rig,
    pe: &Events,
    be: &Events,
    pmark: u64,
    bmark: u64,
    timeout: Duration,
) -> Winner {
    let t0 = Instant::now();
    loop {
        let b = be.all(bmark, false).unwrap_or_default();
        let p = pe.all(pmark, false).unwrap_or_default();
        let backup_runs = b
            .iter()
            .any(|e| matches!(e.kind, EventKind::FailoverComplete(_)));
        let backup_detached = b.iter().any(|e| {
            matches!(
                &e.kind,
                EventKind::Arbitrated { outcome, .. } if outcome == "lost"
            )
        });
        let primary_ran_on = p.iter().any(|e| {
            matches!(
                &e.kind,
                EventKind::Arbitrated { outcome, .. } if outcome == "won"
            )
        });
        let primary_down = p
            .iter()
            .any(|e| matches!(e.kind, EventKind::StoodDown { .. }));
        if backup_runs && (primary_down || rig.primary_status().is_err()) {
            return Winner::Backup;
        }
        if primary_ran_on && backup_detached {
            return Winner::Primary;
        }
        assert!(
            t0.elapsed() < timeout,
            "no decision within {timeout:?}: primary events {:?}, backup events {:?}",
            p.iter().map(|e| e.kind.name()).collect::<Vec<_>>(),
            b.iter().map(|e| e.kind.name()).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A partition of the replication link (`cut`) with both hosts and the arbiter alive.
fn partition(rep: &mut Report, cut: Cut) {
    let mut rig = start_with_arbiter(rep);
    let pe = Events::at(rig.dir.join("primary.sock"));
    let be = Events::at(rig.dir.join("backup.sock"));
    let (pmark, bmark) = (pe.mark().expect("mark"), be.mark().expect("mark"));
    rep.step(format!("partition: {cut:?}"));
    let cut_at = Instant::now();
    rig.ha.cut_replication(cut).expect("cut");
    let winner = settle(&rig, &pe, &be, pmark, bmark, Duration::from_secs(30));
    rep.note(format!(
        "{winner:?} won, {:.2}s after the cut",
        cut_at.elapsed().as_secs_f64()
    ));
    rep.step("counting frames at both TAPs while the client goes on");
    let (p, b) = frames_during(&rig, Duration::from_secs(3));
    rep.note(format!("frames out in 3 s: primary {p}, backup {b}"));
    match winner {
        Winner::Backup => {
            assert_eq!(p, 0, "SPLIT BRAIN: the fenced primary's VM sent {p} frames");
            assert!(b > 0, "the backup's VM serves nobody");
        }
        Winner::Primary => {
            assert_eq!(
                b, 0,
                "SPLIT BRAIN: the detached backup's VM sent {b} frames"
            );
            assert!(p > 0, "the primary's VM serves nobody");
        }
    }
    rig.wait_stream(cut_at, "the client's stream goes on with the winner");
    let (pr, client) = rig.finish_work();
    rep.recover = pr.max_gap_after(cut_at - Duration::from_secs(1));
    check_stream(rep, &pr, client, &format!("{winner:?}").to_lowercase());
    rig.assert_no_panics();
    rep.done(format!(
        "{winner:?} won the arbiter; loser silent (frames out: primary {p}, backup {b}); stream intact"
    ));
}

#[test]
fn partition_both_ways_one_replica() {
    let mut rep = Report::new("partition_both_ways_one_replica");
    partition(&mut rep, Cut::Drop(Direction::Both));
}

#[test]
fn partition_primary_to_backup_one_replica() {
    let mut rep = Report::new("partition_primary_to_backup_one_replica");
    partition(&mut rep, Cut::Drop(Direction::PrimaryToBackup));
}

#[test]
fn partition_backup_to_primary_one_replica() {
    let mut rep = Report::new("partition_backup_to_primary_one_replica");
    partition(&mut rep, Cut::Drop(Direction::BackupToPrimary));
}

/// p↔b and p↔etcd cut: the backup wins the claim and takes over; the primary can reach
/// neither, so it holds every frame (never releasing what the backup lacks). When its link
/// to etcd returns it learns it lost and stands down.
#[test]
fn partition_and_the_primary_loses_the_arbiter() {
    let mut rep = Report::new("partition_and_the_primary_loses_the_arbiter");
    let mut rig = start_with_arbiter(&mut rep);
    let pe = Events::at(rig.dir.join("primary.sock"));
    let be = Events::at(rig.dir.join("backup.sock"));
    let (pmark, bmark) = (pe.mark().expect("mark"), be.mark().expect("mark"));
    rep.step("cutting p↔etcd, then p↔b");
    let etcd = rig.etcd.as_ref().expect("etcd");
    etcd.cut(HostRole::Primary).expect("cut p↔etcd");
    let cut_at = Instant::now();
    rig.ha
        .cut_replication(Cut::Drop(Direction::Both))
        .expect("cut");
    wait_takeover(&be, bmark, "the backup wins the arbiter and takes over");
    pe.wait(
        pmark,
        "the primary holding",
        Duration::from_secs(30),
        |e| matches!(&e.kind, EventKind::BackupLost { policy, .. } if policy == "hold"),
    )
    .expect("the primary, without backup or arbiter, holds its output");
    let st = rig.primary_status().expect("primary status");
    let why = st["why_not"].as_str().unwrap_or_default().to_string();
    rep.note(format!(
        "primary status: protected {}, why not: {why}",
        st["protected"]
    ));
    assert_eq!(st["protected"], false);
    assert!(
        why.contains("output held") && why.contains("arbiter does not answer"),
        "twin status does not say why output is held: {why:?}"
    );
    let (p, b) = frames_during(&rig, Duration::from_secs(3));
    rep.note(format!(
        "frames out in 3 s, primary cut off: primary {p}, backup {b}"
    ));
    assert_eq!(
        p, 0,
        "SPLIT BRAIN: the cut-off primary's VM sent {p} frames"
    );
    assert!(b > 0);
    rep.step("p↔etcd back: the primary learns it lost and stands down");
    rig.etcd
        .as_ref()
        .expect("etcd")
        .restore(HostRole::Primary)
        .expect("restore");
    pe.wait(
        pmark,
        "the primary standing down",
        Duration::from_secs(30),
        |e| matches!(e.kind, EventKind::StoodDown { .. }),
    )
    .expect("the primary stands down once it hears the arbiter");
    let (p2, _) = frames_during(&rig, Duration::from_secs(2));
    assert_eq!(p2, 0, "the fenced primary's VM sent {p2} frames");
    rig.wait_stream(cut_at, "the client's stream goes on with the backup");
    rig.finish_and_check(&mut rep, cut_at, "backup");
    rig.assert_no_panics();
    rep.done("backup won; cut-off primary held everything, then stood down; stream intact");
}

/// b↔etcd cut, then the primary dies: the backup cannot reach the arbiter, so it does not
/// take over (availability traded for never two VMs); when the link returns it claims,
/// wins (nobody else changed the record) and takes over.
#[test]
fn backup_without_the_arbiter_waits_then_takes_over() {
    let mut rep = Report::new("backup_without_the_arbiter_waits_then_takes_over");
    let mut rig = start_with_arbiter(&mut rep);
    let be = Events::at(rig.dir.join("backup.sock"));
    let bmark = be.mark().expect("mark");
    rep.step("cutting b↔etcd, then SIGKILL of the primary");
    rig.etcd
        .as_ref()
        .expect("etcd")
        .cut(HostRole::Backup)
        .expect("cut b↔etcd");
    rig.primary.kill().expect("SIGKILL the primary");
    let died = Instant::now();
    no_takeover_without_the_arbiter(&be, bmark, Duration::from_secs(3));
    let st = rig.backup_status().expect("backup status");
    assert_eq!(st["state"], "claiming", "{st}");
    rep.step("b↔etcd back: the claim wins, the backup takes over");
    rig.etcd
        .as_ref()
        .expect("etcd")
        .restore(HostRole::Backup)
        .expect("restore");
    took_over_once_it_answers(
        &mut rep,
        &mut rig,
        (&be, bmark),
        died,
        "the backup takes over once the arbiter answers",
    );
    rep.done(
        "no takeover while the arbiter was unreachable; took over once it answered; stream intact",
    );
}

/// etcd itself down when the primary dies: no takeover; etcd restarted on its data: the
/// backup's claim wins and it takes over.
#[test]
fn etcd_down_during_a_failover() {
    let mut rep = Report::new("etcd_down_during_a_failover");
    let mut rig = start_with_arbiter(&mut rep);
    let be = Events::at(rig.dir.join("backup.sock"));
    let bmark = be.mark().expect("mark");
    rep.step("etcd killed, then the primary");
    rig.etcd.as_mut().expect("etcd").kill().expect("kill etcd");
    rig.primary.kill().expect("SIGKILL the primary");
    let died = Instant::now();
    no_takeover_without_the_arbiter(&be, bmark, Duration::from_secs(2));
    rep.step("etcd restarted on its data");
    let dir_etcd = rig.etcd.as_mut().expect("etcd");
    dir_etcd.restart(&rig.dir).expect("restart etcd");
    took_over_once_it_answers(
        &mut rep,
        &mut rig,
        (&be, bmark),
        died,
        "the backup takes over once etcd is back",
    );
    rep.done("no takeover while etcd was down; took over once it came back; stream intact");
}

/// The primary stalled (SIGSTOP) past the backup's timeout: the backup wins the claim and
/// takes over; the thawed primary learns it lost and stands down — one replica's frames.
#[test]
fn primary_stalled_past_the_timeout_with_an_arbiter() {
    let mut rep = Report::new("primary_stalled_past_the_timeout_with_an_arbiter");
    let mut rig = start_with_arbiter(&mut rep);
    let pe = Events::at(rig.dir.join("primary.sock"));
    let be = Events::at(rig.dir.join("backup.sock"));
    let (pmark, bmark) = (pe.mark().expect("mark"), be.mark().expect("mark"));
    rep.step("SIGSTOP of the primary for 2 s");
    rig.primary.signal(Signal::Stop).expect("SIGSTOP");
    let stopped = Instant::now();
    wait_takeover(&be, bmark, "the backup takes over");
    std::thread::sleep(Duration::from_secs(2).saturating_sub(stopped.elapsed()));
    rig.primary.signal(Signal::Cont).expect("SIGCONT");
    let stood = pe
        .wait(
            pmark,
            "the primary standing down",
            Duration::from_secs(30),
            |e| matches!(e.kind, EventKind::StoodDown { .. }),
        )
        .expect("the thawed primary stands down");
    rep.note(format!("primary: {:?}", stood.kind));
    let decided = be.all(bmark, false).expect("events").into_iter().any(|e| {
        matches!(
            &e.kind,
            EventKind::SessionEnded {
                decision: Decision::TakeOver,
                ..
            }
        )
    });
    assert!(decided);
    let (p, b) = frames_during(&rig, Duration::from_secs(3));
    rep.note(format!("frames out in 3 s: primary {p}, backup {b}"));
    assert_eq!(p, 0, "SPLIT BRAIN: the thawed primary's VM sent {p} frames");
    rig.wait_stream(stopped, "the client's stream goes on with the backup");
    rig.finish_and_check(&mut rep, stopped, "backup");
    rig.assert_no_panics();
    rep.done("backup won; the thawed primary stood down; one replica's frames; stream intact");
}

/// Three hosts: the primary dies, the backup takes over and protects the VM again to the
/// standby (`--reprotect`), then the backup dies and the standby takes over. One client
/// connection's INCR sequence is continuous across both failovers, and the arbiter's
/// generation rises at each.
#[test]
fn three_hosts_two_failovers() {
    three_hosts(Report::new("three_hosts_two_failovers"), false);
}

/// [`three_hosts_two_failovers`] with the guest's store on a disk: the re-protection copies
/// the disk replica to the standby too, and after the second takeover a cold boot of the
/// standby's replica has every acknowledged INCR.
#[test]
fn three_hosts_two_failovers_with_a_disk() {
    three_hosts(Report::new("three_hosts_two_failovers_with_a_disk"), true);
}

fn three_hosts(mut rep: Report, disk: bool) {
    rep.step("building the layout with a standby, and etcd");
    let ha = Topology::ha_with_standby().expect("layout");
    let dir = TestDir::new(if disk {
        "three-hosts-disk"
    } else {
        "three-hosts"
    })
    .expect("dir");
    let path = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let (primary_disk, backup_replica, standby_replica) = (
        path("primary-disk.img"),
        path("backup-replica"),
        path("standby-replica"),
    );
    if disk {
        std::fs::File::create(&primary_disk)
            .and_then(|f| f.set_len(twin_lab::rig::DISK_SIZE))
            .expect("the primary's disk image");
    }
    let with_disk = |flag: &'static str, v: &str| -> Vec<String> {
        if disk {
            vec![flag.to_string(), v.to_string()]
        } else {
            Vec::new()
        }
    };
    let standby_disk = with_disk("--replica-dir", &standby_replica);
    let backup_disk = with_disk("--replica-dir", &backup_replica);
    let primary_disk_args = with_disk("--disk", &primary_disk);
    let etcd = twin_lab::etcd::EtcdHost::start(&ha, &dir).expect("etcd");
    let key = dir.key_file();
    let standby_listen = format!("{STANDBY_REPL_ADDR}:{REPL_PORT}");
    let sock = |n: &str| dir.join(format!("{n}.sock")).to_string_lossy().into_owned();
    let cons = |n: &str| {
        dir.join(format!("{n}.console"))
            .to_string_lossy()
            .into_owned()
    };
    let (ssock, scons) = (sock("standby"), cons("standby"));
    let surl = etcd.url(HostRole::Standby);
    let mut standby = spawn_twin(
        &ha.host(HostRole::Standby).ns,
        &dir,
        "standby",
        &[
            "backup",
            "--key-file",
            &key,
            "--listen",
            &standby_listen,
            "--tap",
            TAP,
            "--arbiter",
            &surl,
            "--control",
            &ssock,
            "--console",
            &scons,
        ]
        .into_iter()
        .chain(standby_disk.iter().map(String::as_str))
        .collect::<Vec<_>>(),
        "",
    );
    wait_listening(&mut standby, &dir.join("standby.sock"));
    let mut auth = Auth::Key.args(&dir, false);
    auth.extend(["--arbiter".into(), etcd.url(HostRole::Backup)]);
    let mut backup_extra = vec!["--reprotect", standby_listen.as_str()];
    backup_extra.extend(backup_disk.iter().map(String::as_str));
    let mut backup = spawn_backup(&ha, &dir, "backup", &auth, &backup_extra, "");
    let mut pauth = Auth::Key.args(&dir, true);
    pauth.extend(["--arbiter".into(), etcd.url(HostRole::Primary)]);
    let mut primary = spawn_primary(
        &ha,
        &dir,
        "primary",
        &backup_listen(),
        &pauth,
        &["--guest-args", GUEST_ARGS]
            .into_iter()
            .chain(primary_disk_args.iter().map(String::as_str))
            .collect::<Vec<_>>(),
        "",
    );
    let pe = Events::at(dir.join("primary.sock"));
    let be = Events::at(dir.join("backup.sock"));
    let se = Events::at(dir.join("standby.sock"));
    pe.wait_ready(Duration::from_secs(30))
        .expect("primary control");
    pe.wait(0, "protection", PROTECT_TIMEOUT, |e| {
        matches!(e.kind, EventKind::Protected { .. })
    })
    .expect("the primary is protected by the backup");
    let client = GuestClient::connect_retry(ha.client_ns(), guest_service(), BOOT_TIMEOUT, || {
        primary.ensure_running()
    })
    .expect("the guest serves");
    let work = Workload::start(client, RIDE_THROUGH);
    work.wait_replies_after(Instant::now(), PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("protected stream");

    rep.step("SIGKILL of the primary: the backup takes over and protects the VM to the standby");
    let bmark = be.mark().expect("mark");
    primary.kill().expect("SIGKILL the primary");
    let first = Instant::now();
    let won = be
        .wait(
            bmark,
            "the backup's claim",
            FAILOVER_TIMEOUT,
            |e| matches!(&e.kind, EventKind::Arbitrated { outcome, .. } if outcome == "won"),
        )
        .expect("the backup wins the arbiter");
    be.wait(bmark, "re-protection", PROTECT_TIMEOUT, |e| {
        matches!(e.kind, EventKind::Protected { .. })
    })
    .expect("the backup, now primary, is protected by the standby");
    work.wait_replies_after(first, PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("the stream goes on with the backup");
    let reprotected = first.elapsed();

    rep.step("SIGKILL of the backup: the standby takes over");
    let smark = se.mark().expect("mark");
    backup.kill().expect("SIGKILL the backup");
    let second = Instant::now();
    let won2 = se
        .wait(
            smark,
            "the standby's claim",
            FAILOVER_TIMEOUT,
            |e| matches!(&e.kind, EventKind::Arbitrated { outcome, .. } if outcome == "won"),
        )
        .expect("the standby wins the arbiter");
    se.wait(smark, "the second takeover", FAILOVER_TIMEOUT, |e| {
        matches!(e.kind, EventKind::FailoverComplete(_))
    })
    .expect("the standby takes over");
    work.wait_replies_after(second, PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("the stream goes on with the standby");
    let generation = |e: &twin_api::Event| match &e.kind {
        EventKind::Arbitrated { generation, .. } => generation.unwrap_or(0),
        _ => 0,
    };
    let (g1, g2) = (generation(&won), generation(&won2));
    assert!(g2 > g1 && g1 >= 2, "generations {g1} then {g2}");
    rep.note(format!(
        "generations {g1} → {g2}; re-protected {:.1}s after the first kill",
        reprotected.as_secs_f64()
    ));
    let (p, client) = work.finish(RIDE_THROUGH + Duration::from_secs(5));
    rep.recover = p.max_gap_after(first - Duration::from_secs(1));
    check_stream(&mut rep, &p, client, "standby");
    if disk {
        rep.step("SIGKILL the standby's VM, cold boot its disk replica");
        standby.kill().expect("SIGKILL the standby");
        let image = dir.join("standby-replica").join("disk-0.img");
        let image = image.to_string_lossy().into_owned();
        let mut cold = spawn_twin(
            &ha.host(HostRole::Standby).ns,
            &dir,
            "cold",
            &[
                "run", "--tap", TAP, "--ip", GUEST_CIDR, "--mem", "256M", "--disk", &image,
            ],
            "",
        );
        let mut g =
            GuestClient::connect_retry(ha.client_ns(), guest_service(), BOOT_TIMEOUT, || {
                cold.ensure_running()
            })
            .unwrap_or_else(|e| {
                panic!("the cold-booted replica answers: {e:#}\n{}", cold.tail(20))
            });
        assert_eq!(
            g.get(KEY).expect("GET after the cold boot"),
            p.last,
            "the standby's disk replica (copied at re-protection, then kept) has every \
             acknowledged INCR"
        );
        rep.note(format!(
            "cold boot of the standby's replica: GET {} = {}",
            p.last, p.last
        ));
        drop(g);
        cold.terminate().expect("SIGTERM");
        let _ = cold.wait_exit(Duration::from_secs(10));
        assert_no_panic(&cold);
    }
    assert_no_panic(&standby);
    drop(etcd);
    rep.done(format!(
        "p → b (generation {g1}) → re-protected to s → s (generation {g2}); one connection, INCRs continuous"
    ));
}
