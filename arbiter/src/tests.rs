//! Against a real etcd (Debian's `etcd-server`, which `.ci/run` installs), on loopback.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// An etcd server of its own in a temporary directory; killed on drop.
struct Etcd {
    child: Child,
    dir: std::path::PathBuf,
    url: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    fn start() -> Etcd {
        let dir = std::env::temp_dir().join(format!(
            "twin-arbiter-test-{}-{}",
            std::process::id(),
            free_port()
        ));
        let (client, peer) = (free_port(), free_port());
        let child = Command::new("etcd")
            .args([
                "--data-dir",
                dir.to_str().unwrap(),
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "etcd must be installed for these tests (Debian: etcd-server; .ci/run installs it)",
            );
        let url = format!("etcd://127.0.0.1:{client}");
        let a = Arbiter::new(&url).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while a.get("probe").is_err() {
            assert!(Instant::now() < deadline, "etcd did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Etcd { child, dir, url }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn owner(id: &str) -> Owner {
    Owner {
        id: id.into(),
        label: format!("test {id}"),
    }
}

#[test]
fn claims_compare_and_swap_on_the_revision() {
    let etcd = Etcd::start();
    let a = Arbiter::new(&etcd.url).unwrap();
    let none = a.get("vm1").unwrap();
    assert_eq!(none.record, None);
    let Claim::Won(first) = a.claim("vm1", &none, &owner("p")).unwrap() else {
        panic!("the first claim of an absent record wins");
    };
    assert_eq!(first.generation(), 1);
    assert!(first.owned_by("p"));
    assert_eq!(a.get("vm1").unwrap(), first);
    // A second creation attempt (another process that also saw it absent) loses.
    let Claim::Lost(now) = a.claim("vm1", &none, &owner("q")).unwrap() else {
        panic!("a claim on a stale view must lose");
    };
    assert_eq!(now, first);
    // The backup, having seen generation 1, takes it at 2; the primary's claim on what it
    // saw loses and names the new owner.
    let Claim::Won(second) = a.claim("vm1", &first, &owner("b")).unwrap() else {
        panic!("a claim on the current view wins");
    };
    assert_eq!(second.generation(), 2);
    let Claim::Lost(lost) = a.claim("vm1", &first, &owner("p")).unwrap() else {
        panic!("the loser of the race loses");
    };
    assert!(lost.owned_by("b"));
    assert_eq!(lost.generation(), 2);
    // The backup's claim again on the view it had (its first answer lost on the way back):
    // the record it finds is its own claim, so it has won, at the same generation.
    let Claim::Won(again) = a.claim("vm1", &first, &owner("b")).unwrap() else {
        panic!("a retried claim that had landed must win");
    };
    assert_eq!(again, second);
    // Another incarnation with the same view still loses.
    let other = Owner {
        id: "b2".into(),
        label: "test b".into(),
    };
    assert!(matches!(
        a.claim("vm1", &first, &other).unwrap(),
        Claim::Lost(_)
    ));
}

#[test]
fn of_two_racing_claims_exactly_one_wins() {
    let etcd = Etcd::start();
    let a = Arbiter::new(&etcd.url).unwrap();
    for round in 0..20 {
        let vm = format!("race{round}");
        let Claim::Won(seen) = a.claim(&vm, &a.get(&vm).unwrap(), &owner("p")).unwrap() else {
            panic!("create");
        };
        let (a1, a2, s1, s2) = (a.clone(), a.clone(), seen.clone(), seen.clone());
        let (v1, v2) = (vm.clone(), vm.clone());
        let t1 = std::thread::spawn(move || a1.claim(&v1, &s1, &owner("primary")).unwrap());
        let t2 = std::thread::spawn(move || a2.claim(&v2, &s2, &owner("backup")).unwrap());
        let (r1, r2) = (t1.join().unwrap(), t2.join().unwrap());
        let wins = [&r1, &r2]
            .iter()
            .filter(|r| matches!(r, Claim::Won(_)))
            .count();
        assert_eq!(wins, 1, "round {round}: {r1:?} / {r2:?}");
        assert_eq!(a.get(&vm).unwrap().generation(), 2);
    }
}

#[test]
fn a_watch_sees_the_claim_that_beats_it() {
    let etcd = Etcd::start();
    let a = Arbiter::new(&etcd.url).unwrap();
    let Claim::Won(seen) = a.claim("vmw", &a.get("vmw").unwrap(), &owner("p")).unwrap() else {
        panic!("create");
    };
    let (a2, s2) = (a.clone(), seen.clone());
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        a2.claim("vmw", &s2, &owner("b")).unwrap()
    });
    let mut got = None;
    a.watch("vmw", seen.revision, &|| false, &mut |s| {
        got = Some(s);
        false
    })
    .unwrap();
    assert!(matches!(t.join().unwrap(), Claim::Won(_)));
    let s = got.expect("the watch reports the change");
    assert!(s.owned_by("b"));
    assert_eq!(s.generation(), 2);
}

#[test]
fn unreachable_and_malformed() {
    // A port nothing listens on: a clear error, quickly.
    let url = format!("etcd://127.0.0.1:{}", free_port());
    let a = Arbiter::new(&url).unwrap();
    let t0 = Instant::now();
    let e = a.get("vm").unwrap_err();
    assert!(matches!(e, ArbiterError::Unreachable { .. }), "{e}");
    assert!(t0.elapsed() < REQUEST_TIMEOUT * 2);
    for bad in ["http://x:1", "etcd://", "etcd://nohostport"] {
        assert!(
            matches!(Arbiter::new(bad), Err(ArbiterError::BadUrl(_))),
            "{bad}"
        );
    }
}

#[test]
fn given_away_names_the_owner_and_generation_or_nobody() {
    let none = Seen {
        record: None,
        revision: 0,
    };
    assert_eq!(
        none.given_away(),
        "the arbiter gives the VM to nobody (generation 0)"
    );
    let taken = Seen {
        record: Some(Record {
            owner: Owner {
                id: "b-1".into(),
                label: "backup on 10.0.0.2".into(),
            },
            generation: 7,
        }),
        revision: 12,
    };
    assert!(taken.owned_by("b-1") && !taken.owned_by("p-1"));
    assert_eq!(
        taken.given_away(),
        "the arbiter gives the VM to backup on 10.0.0.2 (generation 7)"
    );
}
