//! Running Twin as a service:
//!
//! - the systemd units of `contrib/systemd/` parse clean with `systemd-analyze verify`
//!   (their `Documentation=man:twin(1)` found in the man page `twin man` writes), and the
//!   check is not vacuous: a unit with a typo'd key does not;
//! - `Type=notify` holds: `twin backup` says READY=1 once it listens, `twin protect` only
//!   once its backup holds the first checkpoint (and not while it waits for one);
//! - `--config FILE` gives a process its flags, the command line overrides them, and a bad
//!   value in the file fails at parse time naming the flag;
//! - shell completions and the man page are generated and well-formed.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use twin_api::EventKind;
use twin_lab::events::Events;
use twin_lab::rig::backup_listen;
use twin_lab::*;

const UNITS: [&str; 2] = ["twin-backup@.service", "twin-protect@.service"];
/// Where the units expect the binary (`cargo install --path twin --root /usr/local`).
const INSTALLED: &str = "/usr/local/bin/twin";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `systemd-analyze verify` of `units` (paths) with the man page of `man_dir`: success and
/// everything it said.
fn verify(units: &[PathBuf], man_dir: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(units)
        .env("MANPATH", man_dir)
        .output()
        .expect("systemd-analyze (in package systemd; .ci/run installs it)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .trim()
        .to_string(),
    )
}

#[test]
fn the_systemd_units_verify() {
    let dir = TestDir::new("units").expect("test dir");
    let bin = twin_bin().expect("twin");
    // The man page the units' Documentation= names, as `twin man` writes it.
    let man = dir.join("man");
    std::fs::create_dir_all(man.join("man1")).expect("mkdir");
    let page = Command::new(&bin).arg("man").output().expect("twin man");
    assert!(page.status.success());
    std::fs::write(man.join("man1/twin.1"), &page.stdout).expect("write twin.1");

    // Each template as an instance, the binary where this build has it (the only change).
    let mut instances = Vec::new();
    for unit in UNITS {
        let text = std::fs::read_to_string(repo().join("contrib/systemd").join(unit))
            .unwrap_or_else(|e| panic!("contrib/systemd/{unit}: {e}"));
        assert!(
            text.contains("\nType=notify\n"),
            "{unit} is not Type=notify"
        );
        assert!(
            text.contains(&format!("ExecStart={INSTALLED} ")),
            "{unit}: ExecStart"
        );
        let path = dir.join(unit.replace("@.", "@web."));
        std::fs::write(&path, text.replace(INSTALLED, &bin.display().to_string()))
            .expect("write unit");
        instances.push(path);
    }
    let (ok, said) = verify(&instances, &man);
    eprintln!("systemd-analyze verify {instances:?}: ok={ok} {said:?}");
    assert!(
        ok && said.is_empty(),
        "the units do not verify clean:\n{said}"
    );

    // The check sees mistakes: a typo'd key and a wrong type are reported.
    let text = std::fs::read_to_string(&instances[0]).expect("read");
    let bad = dir.join("twin-bad@web.service");
    std::fs::write(
        &bad,
        text.replace("Type=notify", "Type=notfy")
            .replace("KillMode=mixed", "KillMod=mixed"),
    )
    .expect("write");
    let (_, said) = verify(&[bad], &man);
    assert!(
        said.contains("notfy") && said.contains("KillMod"),
        "a broken unit passed systemd-analyze verify: {said:?}"
    );
}

/// A datagram socket standing in for systemd's `$NOTIFY_SOCKET`.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn bind(dir: &TestDir, name: &str) -> Self {
        let path = dir.join(name);
        let sock = UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
        Notify { sock, path }
    }

    /// The next message within `wait`.
    fn recv(&self, wait: Duration) -> Option<String> {
        self.sock
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Waits for a message containing READY=1; returns it and the ones before it.
    fn wait_ready(&self, timeout: Duration) -> (Option<String>, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.recv(left) {
                Some(m) if m.lines().any(|l| l == "READY=1") => return (Some(m), before),
                Some(m) => before.push(m),
                None => break,
            }
        }
        (None, before)
    }
}

#[test]
fn type_notify_ready_when_listening_and_when_protected_and_config_files() {
    require_kvm();
    let ha = Topology::ha().expect("ha topology");
    let dir = TestDir::new("notify").expect("test dir");
    let bin = twin_bin().expect("twin");
    let key = dir.key_file();

    // The backup from a config file; --control on the command line overrides the file's.
    let bsock = dir.join("backup.sock");
    let bcfg = dir.join("backup.toml");
    std::fs::write(
        &bcfg,
        format!(
            "listen = \"{}\"\nkey-file = \"{key}\"\ntap = \"{TAP}\"\ncontrol = \"{}\"\n\
             console = \"{}\"\nheartbeat-timeout = \"100ms\"\n",
            backup_listen(),
            dir.join("not-this.sock").display(),
            dir.join("backup.console").display()
        ),
    )
    .expect("write backup.toml");
    let bnotify = Notify::bind(&dir, "backup.notify");
    let bnotify_path = bnotify.path.display().to_string();
    let (bcfg_s, bsock_s) = (bcfg.display().to_string(), bsock.display().to_string());
    let mut backup = TwinProcess::spawn_program(
        &ha.backup.ns,
        &dir,
        "twin-backup",
        &bin,
        &["backup", "--config", &bcfg_s, "--control", &bsock_s],
        &[("NOTIFY_SOCKET", &bnotify_path)],
    )
    .expect("spawn twin backup");
    let (ready, before) = bnotify.wait_ready(Duration::from_secs(30));
    eprintln!("backup notified {before:?} then {ready:?}");
    let ready =
        ready.unwrap_or_else(|| panic!("the backup never said READY=1\n{}", backup.tail(20)));
    assert!(
        ready.contains(&format!("STATUS=listening on {}", backup_listen()))
            && ready.contains(&format!("MAINPID={}", backup.pid())),
        "backup READY message: {ready:?}"
    );
    assert!(
        bsock.exists(),
        "--control on the command line did not override the file"
    );
    assert!(
        !dir.join("not-this.sock").exists(),
        "the file's control socket was used"
    );
    Events::at(&bsock)
        .wait_live(&mut backup, 0, "listening", Duration::from_secs(10), |e| {
            matches!(e.kind, EventKind::Listening { .. })
        })
        .expect("backup listening");

    // A bad value in a config file: exit 2 at parse time, naming the flag.
    let badcfg = dir.join("bad.toml");
    std::fs::write(&badcfg, "mem = \"3M\"\ntap = \"tap0\"\n").expect("write");
    let out = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&badcfg)
        .output()
        .expect("twin run --config bad.toml");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(2) && err.contains("--mem") && err.contains("multiple of 2M"),
        "a config with mem = 3M: exit {:?}: {err}",
        out.status.code()
    );

    // The primary: not READY while it cannot reach its backup, READY once protected.
    let psock = dir.join("vm.sock");
    let pnotify = Notify::bind(&dir, "primary.notify");
    let pnotify_path = pnotify.path.display().to_string();
    let (psock_s, pcons) = (
        psock.display().to_string(),
        dir.join("vm.console").display().to_string(),
    );
    // First pointed at a port where nothing listens: it waits, unprotected, not ready.
    let nowhere = format!("{BACKUP_REPL_ADDR}:7399");
    let args = |backup: &str| -> Vec<String> {
        [
            "protect",
            "--key-file",
            &key,
            "--backup",
            backup,
            "--tap",
            TAP,
            "--ip",
            GUEST_CIDR,
            "--mem",
            "128M",
            "--control",
            &psock_s,
            "--console",
            &pcons,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a = args(&nowhere);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut waiting = TwinProcess::spawn_program(
        &ha.primary.ns,
        &dir,
        "twin-protect-nowhere",
        &bin,
        &a,
        &[("NOTIFY_SOCKET", &pnotify_path)],
    )
    .expect("spawn twin protect");
    Events::at(&psock)
        .wait_live(
            &mut waiting,
            0,
            "the VM running",
            Duration::from_secs(60),
            |e| matches!(e.kind, EventKind::VmRunning { .. }),
        )
        .expect("VM running");
    let (ready, before) = pnotify.wait_ready(Duration::from_secs(3));
    assert!(
        ready.is_none(),
        "twin protect said READY=1 with no backup to hold its checkpoints: {ready:?} \
         (before: {before:?})"
    );
    waiting.terminate().expect("SIGTERM");
    waiting.wait_exit(Duration::from_secs(10)).expect("exit");

    let a = args(&backup_listen());
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut primary = TwinProcess::spawn_program(
        &ha.primary.ns,
        &dir,
        "twin-protect",
        &bin,
        &a,
        &[("NOTIFY_SOCKET", &pnotify_path)],
    )
    .expect("spawn twin protect");
    let pevents = Events::at(&psock).record(false);
    let (ready, _) = pnotify.wait_ready(Duration::from_secs(90));
    let ready = ready.unwrap_or_else(|| {
        panic!(
            "twin protect never said READY=1; events {:?}\n{}",
            pevents.names_since(0),
            tails(&[&primary, &backup])
        )
    });
    eprintln!("primary notified {ready:?}");
    assert!(
        ready.contains(&format!("STATUS=protected by {}", backup_listen())),
        "{ready:?}"
    );
    let protected = pevents
        .wait(0, "protected", Duration::from_secs(5), |e| {
            matches!(e.kind, EventKind::Protected { .. })
        })
        .expect("the protected event");
    eprintln!("READY=1 after the protected event (seq {})", protected.seq);
    primary.terminate().expect("SIGTERM");
    primary.wait_exit(Duration::from_secs(10)).expect("exit");
    assert_no_panic(&primary);
    assert_no_panic(&backup);
}

#[test]
fn completions_and_the_man_page_are_generated() {
    let bin = twin_bin().expect("twin");
    let dir = TestDir::new("completions").expect("test dir");
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Command::new(&bin)
            .args(["completions", shell])
            .output()
            .expect("twin completions");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("protect") && text.contains("backup"),
            "twin completions {shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if shell == "bash" {
            let path = dir.join("twin.bash");
            std::fs::write(&path, text.as_bytes()).expect("write");
            let check = Command::new("bash")
                .arg("-n")
                .arg(&path)
                .output()
                .expect("bash -n");
            assert!(
                check.status.success(),
                "the bash completion script does not parse: {}",
                String::from_utf8_lossy(&check.stderr)
            );
            // Completing `twin pro<TAB>` in bash offers protect.
            let script = format!(
                "source {}; COMP_WORDS=(twin pro); COMP_CWORD=1; COMP_LINE='twin pro'; \
                 COMP_POINT=8; _twin twin pro twin; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                path.display()
            );
            let out = Command::new("bash")
                .arg("-c")
                .arg(&script)
                .output()
                .expect("bash");
            let offered = String::from_utf8_lossy(&out.stdout);
            assert!(
                offered.lines().any(|l| l == "protect"),
                "bash completion of `twin pro`: {offered:?} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let out = Command::new(&bin).arg("man").output().expect("twin man");
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && page.contains(".TH twin 1"),
        "{page}"
    );
    // man renders it, and it lists the subcommands.
    let path = dir.join("twin.1");
    std::fs::write(&path, page.as_bytes()).expect("write");
    let out = Command::new("man")
        .arg("-l")
        .arg(&path)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .expect("man -l");
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["protect", "backup", "status", "snapshot", "completions"] {
        assert!(
            text.contains(sub),
            "no {sub} in the rendered man page:\n{text}"
        );
    }
}
