//! A VM started with `twin run` is put under protection later, as `xl remus DOMID HOST`
//! does: `twin protect --control SOCK --backup HOST:PORT` asks its process (PUT
//! /v1/protect), a live initial sync runs while the guest keeps serving, then epochs; the
//! client's counter survives a SIGKILL of that process, on the backup that took over.
//!
//! On the way it checks what an operator reads: `twin status` leads with "Not protected" /
//! "Protected by", `--check` exits 1 / 0; the Prometheus endpoint (`--metrics`) is scraped
//! before and after (status gauges, the pause and ack-latency histograms fill); the
//! process logs JSON lines with `TWIN_LOG_FORMAT=json`.

use std::process::Command;
use std::time::{Duration, Instant};

use twin_api::EventKind;
use twin_lab::events::Events;
use twin_lab::rig::{backup_listen, spawn_backup};
use twin_lab::*;

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const PROTECT_TIMEOUT: Duration = Duration::from_secs(90);
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30);
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
const METRICS_ADDR: &str = "127.0.0.1:9465";

/// `twin status [--check]` (text) of `sock`: exit code and stdout.
fn status_text(sock: &std::path::Path, check: bool) -> (Option<i32>, String) {
    let mut cmd = Command::new(twin_bin().expect("twin"));
    cmd.arg("status").arg("--control").arg(sock);
    if check {
        cmd.arg("--check");
    }
    let out = cmd.output().expect("twin status");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Scrapes `--metrics` inside `ns`.
fn scrape(ns: &Netns) -> String {
    let url = format!("http://{METRICS_ADDR}/metrics");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "curl",
            "-sS",
            "--max-time",
            "10",
            &url,
        ])
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "scraping {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the sample `name` (a line `name value`) in an OpenMetrics text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_vm_started_with_twin_run_is_protected_later_and_fails_over() {
    require_kvm();
    let ha = Topology::ha().expect("ha topology");
    let dir = TestDir::new("protect-running").expect("test dir");
    let (psock, bsock) = (dir.join("vm.sock"), dir.join("twin-backup.sock"));
    let key = dir.key_file();
    let auth = vec!["--key-file".to_string(), key.clone()];

    // An unprotected VM, serving a client.
    let psock_s = psock.display().to_string();
    let cons = dir.join("vm.console").display().to_string();
    let bin = twin_bin().expect("twin");
    let mut vm = TwinProcess::spawn_program(
        &ha.primary.ns,
        &dir,
        "twin-run",
        &bin,
        &[
            "run",
            "--tap",
            TAP,
            "--ip",
            GUEST_CIDR,
            "--mem",
            "256M",
            "--guest-args",
            "dirty=16M/s,wss=64M",
            "--control",
            &psock_s,
            "--console",
            &cons,
            "--metrics",
            METRICS_ADDR,
        ],
        &[("TWIN_LOG_FORMAT", "json")],
    )
    .expect("spawn twin run");
    let pevents = Events::at(&psock).record(false);
    pevents
        .wait(0, "the VM running", BOOT_TIMEOUT, |e| {
            matches!(e.kind, EventKind::VmRunning { .. })
        })
        .unwrap_or_else(|e| panic!("twin run: {e}\n{}", vm.tail(20)));
    let mut guest =
        GuestClient::connect_retry(ha.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            vm.ensure_running()
        })
        .expect("guest service");
    guest
        .set_request_timeout(Duration::from_secs(30))
        .expect("request timeout");
    let load = IncrLoad::start(guest, "counter", 0);
    load.wait_for(100, PROGRESS_TIMEOUT, || vm.ensure_running())
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.tail(20)));

    // Not protected: the headline says so and --check exits 1; the metrics say it too.
    let (code, text) = status_text(&psock, true);
    eprintln!("unprotected `twin status --check` (exit {code:?}):\n{text}");
    assert!(
        code == Some(1) && text.starts_with("Not protected: no backup"),
        "an unprotected VM: exit {code:?}\n{text}"
    );
    let m = scrape(&ha.primary.ns);
    assert!(
        m.contains("twin_role{role=\"standalone\"} 1") && m.contains("# EOF"),
        "metrics of the unprotected VM:\n{m}"
    );

    // Protect it, live.
    let mut backup = spawn_backup(&ha, &dir, "twin-backup", &auth, &[], "");
    let bevents = Events::at(&bsock).record(false);
    let before = load.incrs();
    let t0 = Instant::now();
    let out = Command::new(&bin)
        .args([
            "protect",
            "--key-file",
            &key,
            "--backup",
            &backup_listen(),
            "--control",
        ])
        .arg(&psock)
        .output()
        .expect("twin protect --control");
    let took = t0.elapsed();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("twin protect --control ({took:?}):\n{stderr}{stdout}");
    assert!(
        out.status.success() && stdout.starts_with("PROTECTED by"),
        "twin protect --control failed ({took:?}): {stderr}{stdout}\n{}",
        tails(&[&vm, &backup])
    );
    assert!(took < PROTECT_TIMEOUT, "protection took {took:?}");
    assert!(
        stderr.contains("initial sync"),
        "no initial-sync progress printed: {stderr}"
    );
    // The guest served during the live sync.
    let during = load.incrs() - before;
    eprintln!("{during} INCRs answered while `twin protect` ran ({took:?})");
    assert!(
        during > 0,
        "the guest answered nothing during the initial sync"
    );
    pevents
        .wait(0, "the protected event", Duration::from_secs(10), |e| {
            matches!(e.kind, EventKind::Protected { .. })
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&vm, &backup])));
    let kinds = pevents.names_since(0);
    for want in ["backup_connected", "sync_sent", "protected"] {
        assert!(
            kinds.contains(&want),
            "no {want} among the events {kinds:?}"
        );
    }

    // Protected: headline, --check, --json, metrics.
    let mut text = String::new();
    let ok = wait_until(
        "twin status --check to pass",
        Duration::from_secs(10),
        || {
            let (code, t) = status_text(&psock, true);
            text = t;
            Ok(code == Some(0))
        },
    );
    eprintln!("protected `twin status --check`:\n{text}");
    assert!(
        ok.is_ok(),
        "twin status --check of the protected VM:\n{text}"
    );
    assert!(
        text.starts_with(&format!("Protected by {}", backup_listen())),
        "headline:\n{text}"
    );
    for want in ["epochs ", "/s (interval 25.0 ms)", "pause ", "held output "] {
        assert!(text.contains(want), "no {want:?} in\n{text}");
    }
    let js = twin_status(&ha.primary.ns, &dir, &psock, Duration::from_secs(20)).expect("json");
    assert_eq!(js["role"], "primary", "{js}");
    assert_eq!(js["protected"], true, "{js}");
    load.wait_for(load.incrs() + 100, PROGRESS_TIMEOUT, || vm.ensure_running())
        .unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&vm, &backup])));
    let m = scrape(&ha.primary.ns);
    let pauses = sample(&m, "twin_checkpoint_pause_seconds_count").unwrap_or(0.0);
    let acks = sample(&m, "twin_ack_latency_seconds_count").unwrap_or(0.0);
    let sent = sample(&m, "twin_checkpoint_bytes_sent_total").unwrap_or(0.0);
    eprintln!("metrics: {pauses} pauses, {acks} acks, {sent} bytes sent");
    assert!(
        m.contains("twin_role{role=\"primary\"} 1")
            && sample(&m, "twin_protected") == Some(1.0)
            && pauses > 10.0
            && acks > 10.0
            && sent > 0.0
            && sample(&m, "twin_protections_total") == Some(1.0),
        "metrics of the protected VM:\n{m}"
    );

    // The process logged JSON lines.
    let stderr = vm.text(Stream::Stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "twin run logged nothing");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l)
            .unwrap_or_else(|e| panic!("TWIN_LOG_FORMAT=json, a line that is not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }

    // SIGKILL the process that was started unprotected: the backup takes over and the
    // client's counter goes on without a lost acknowledged INCR.
    let n = load.incrs();
    vm.kill().expect("SIGKILL twin run");
    bevents
        .wait(0, "the takeover", TAKEOVER_TIMEOUT, |e| {
            matches!(
                e.kind,
                EventKind::FailoverComplete(_) | EventKind::FailoverFailed { .. }
            )
        })
        .unwrap_or_else(|e| panic!("no takeover: {e}\n{}", tails(&[&vm, &backup])));
    assert!(
        bevents
            .find(0, |e| matches!(e.kind, EventKind::FailoverComplete(_)))
            .is_some(),
        "the takeover failed: {:?}\n{}",
        bevents.names_since(0),
        tails(&[&vm, &backup])
    );
    load.wait_for(n + 100, PROGRESS_TIMEOUT, || backup.ensure_running())
        .unwrap_or_else(|e| panic!("after the takeover: {e}\n{}", tails(&[&vm, &backup])));
    let (mut guest, ops) = load
        .finish()
        .unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&vm, &backup])));
    let last =
        check_incr_sequence(&ops, 1).unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&vm, &backup])));
    assert_eq!(guest.get("counter").expect("GET"), last);
    eprintln!("{last} INCRs in sequence across protect-later and the takeover");
    let (code, text) = status_text(&bsock, false);
    assert_eq!(code, Some(0), "{text}");
    assert_no_panic(&vm);
    assert_no_panic(&backup);
}

/// The same through the API alone, with curl: `PUT /v1/protect` on a `twin run` VM, then a
/// planned switchover, `PUT /v1/failover` on the backup: the backup answers its report,
/// the primary stands down and exits, and the client's counter goes on without a gap.
#[test]
fn protect_then_planned_failover_over_the_api_with_curl() {
    require_kvm();
    let ha = Topology::ha().expect("ha topology");
    let dir = TestDir::new("api-failover").expect("test dir");
    let (psock, bsock) = (dir.join("vm.sock"), dir.join("twin-backup.sock"));
    let key = dir.key_file();
    let auth = vec!["--key-file".to_string(), key.clone()];
    let psock_s = psock.display().to_string();
    let cons = dir.join("vm.console").display().to_string();
    let mut vm = TwinProcess::spawn(
        &ha.primary.ns,
        &dir,
        "twin-run",
        &[
            "run",
            "--tap",
            TAP,
            "--ip",
            GUEST_CIDR,
            "--mem",
            "128M",
            "--control",
            &psock_s,
            "--console",
            &cons,
        ],
    )
    .expect("spawn twin run");
    let pevents = Events::at(&psock).record(false);
    let mut guest =
        GuestClient::connect_retry(ha.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            vm.ensure_running()
        })
        .expect("guest service");
    guest
        .set_request_timeout(Duration::from_secs(30))
        .expect("request timeout");
    let load = IncrLoad::start(guest, "counter", 0);
    load.wait_for(50, PROGRESS_TIMEOUT, || vm.ensure_running())
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.tail(20)));
    let mut backup = spawn_backup(&ha, &dir, "twin-backup", &auth, &[], "");
    let bevents = Events::at(&bsock).record(false);

    let curl = |sock: &std::path::Path, path: &str, body: Option<String>| -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "60",
            "-w",
            "\n%{http_code}",
            "-X",
            "PUT",
        ])
        .arg("--unix-socket")
        .arg(sock);
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "--data-binary", &b]);
        }
        let out = cmd
            .arg(format!("http://localhost{path}"))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    };
    let body = serde_json::json!({"backup": backup_listen(), "key_file": key}).to_string();
    let (code, answer) = curl(&psock, "/v1/protect", Some(body));
    eprintln!("PUT /v1/protect: {code} {answer}");
    assert_eq!(code, 200, "{answer}\n{}", tails(&[&vm, &backup]));
    let v: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(v["mode"], "connecting", "{v}");
    pevents
        .wait(0, "protected", PROTECT_TIMEOUT, |e| {
            matches!(e.kind, EventKind::Protected { .. })
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&vm, &backup])));
    // Protecting twice is a conflict, not a second session.
    let body = serde_json::json!({"backup": backup_listen(), "key_file": key}).to_string();
    let (code, again) = curl(&psock, "/v1/protect", Some(body));
    assert!(
        code == 409
            && again.contains(r#""code":"conflict""#)
            && again.contains("protected already"),
        "a second PUT /v1/protect on a protected VM: {code} {again}"
    );
    load.wait_for(load.incrs() + 50, PROGRESS_TIMEOUT, || vm.ensure_running())
        .unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&vm, &backup])));

    let (code, report) = curl(&bsock, "/v1/failover", None);
    eprintln!("PUT /v1/failover: {code} {report}");
    assert_eq!(code, 200, "{report}\n{}", tails(&[&vm, &backup]));
    let r: serde_json::Value = serde_json::from_str(&report).expect("JSON");
    assert!(r["epoch"].as_u64().is_some(), "failover report: {r}");
    let exited = vm.wait_exit(Duration::from_secs(20));
    assert!(
        exited.is_ok(),
        "the primary did not stand down and exit after the planned failover\n{}",
        tails(&[&vm, &backup])
    );
    pevents.wait_end(Duration::from_secs(5));
    assert!(
        pevents
            .find(0, |e| matches!(e.kind, EventKind::StoodDown { .. }))
            .is_some(),
        "no stood_down among {:?}",
        pevents.names_since(0)
    );
    assert!(bevents
        .find(0, |e| matches!(e.kind, EventKind::FailoverComplete(_)))
        .is_some());
    let n = load.incrs();
    load.wait_for(n + 50, PROGRESS_TIMEOUT, || backup.ensure_running())
        .unwrap_or_else(|e| panic!("after the switchover: {e}\n{}", tails(&[&vm, &backup])));
    let (mut guest, ops) = load
        .finish()
        .unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&vm, &backup])));
    let last =
        check_incr_sequence(&ops, 1).unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&vm, &backup])));
    assert_eq!(guest.get("counter").expect("GET"), last);
    eprintln!("{last} INCRs in sequence across PUT /v1/protect and PUT /v1/failover");
    assert_no_panic(&vm);
    assert_no_panic(&backup);
}
