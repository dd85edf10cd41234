//! The control API end to end, through a real HTTP client (`curl --unix-socket`) and
//! through the `twin` subcommands that are its clients:
//!
//! - every `/v1/...` route of `twin/openapi.yaml` answers on a `twin run` VM: status,
//!   pause/resume (the guest stops answering while paused), snapshot (written where the
//!   body says), events (a finished list and a followed stream), metrics (on the socket and
//!   over TCP with `--metrics`); errors are a status and `{"error": {code, message}}`;
//! - the traps of issue 16: `twin snapshot snap1` writes `snap1` in the *client's*
//!   directory; a snapshot that takes longer than the 30 s the server waits for the main
//!   loop gets its real outcome (with progress meanwhile, and `busy` for other requests)
//!   instead of "did not answer"; bad arguments fail at parse time with exit 2 and the
//!   message of the issue.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use twin_api::EventKind;
use twin_lab::events::Events;
use twin_lab::*;

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const METRICS_ADDR: &str = "127.0.0.1:9464";

/// An error the API must answer: method, path, body; status, code, words of the message.
type ErrorCase<'a> = (&'a str, &'a str, Option<&'a str>, u16, &'a str, &'a str);

/// An HTTP answer as curl saw it.
#[derive(Debug)]
struct Http {
    status: u16,
    headers: String,
    body: String,
}

impl Http {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// The `{"error": {code, message}}` of an error answer.
    fn error(&self) -> (String, String) {
        let v = self.json();
        let code = v["error"]["code"].as_str();
        let msg = v["error"]["message"].as_str();
        match (code, msg) {
            (Some(c), Some(m)) => (c.to_string(), m.to_string()),
            _ => panic!("an error answer without error.code and error.message: {self:?}"),
        }
    }
}

/// `curl` with `args`, the answer's head and body split.
fn curl(args: &[&str]) -> Http {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "60"])
        .args(args)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_http(&String::from_utf8_lossy(&out.stdout))
}

fn parse_http(text: &str) -> Http {
    let (headers, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {headers:?}"));
    Http {
        status,
        headers: headers.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

/// `curl --unix-socket SOCK -X METHOD http://localhost/PATH` (with a JSON body).
fn api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Http {
    let sock = sock.display().to_string();
    let url = format!("http://localhost{path}");
    let mut args = vec!["--unix-socket", &sock, "-X", method];
    if let Some(b) = body {
        args.extend(["-H", "content-type: application/json", "--data-binary", b]);
    }
    args.push(&url);
    curl(&args)
}

fn run_vm(
    topo: &Single,
    dir: &TestDir,
    name: &str,
    sock: &Path,
    env: &[(&str, &str)],
) -> TwinProcess {
    let sock = sock.display().to_string();
    let cons = dir.join(format!("{name}.console")).display().to_string();
    let args = [
        "run",
        "--tap",
        TAP,
        "--ip",
        GUEST_CIDR,
        "--mem",
        "128M",
        "--guest-args",
        "dirty=4M/s,wss=32M",
        "--control",
        &sock,
        "--console",
        &cons,
        "--metrics",
        METRICS_ADDR,
    ];
    let bin = twin_bin().expect("twin binary");
    let mut vm = TwinProcess::spawn_program(topo.vm_ns(), dir, name, &bin, &args, env)
        .expect("spawn twin run");
    Events::at(&sock)
        .wait_live(&mut vm, 0, "the VM running", BOOT_TIMEOUT, |e| {
            matches!(e.kind, EventKind::VmRunning { .. })
        })
        .unwrap_or_else(|e| panic!("twin run does not start: {e}\n{}", vm.tail(20)));
    vm
}

fn event_names(ndjson: &str) -> Vec<String> {
    ndjson
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("event line {l:?}: {e}"));
            v["event"].as_str().unwrap_or("?").to_string()
        })
        .collect()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn every_route_answers_over_http_with_curl() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("api-curl").expect("test dir");
    let sock = dir.join("vm.sock");
    let mut vm = run_vm(&topo, &dir, "twin-run", &sock, &[]);
    let mut guest =
        GuestClient::connect_retry(topo.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            vm.ensure_running()
        })
        .expect("guest service");
    assert_eq!(guest.incr("c").expect("INCR"), 1);

    // Status.
    let st = api(&sock, "GET", "/v1/status", None);
    assert_eq!(st.status, 200, "{st:?}");
    assert!(
        st.headers.contains("content-type: application/json"),
        "{st:?}"
    );
    let v = st.json();
    assert_eq!(v["role"], "standalone", "{v}");
    assert_eq!(v["vm"], "running", "{v}");
    assert_eq!(v["pid"].as_u64(), Some(u64::from(vm.pid())), "{v}");

    // Pause: the guest stops answering until resumed.
    let p = api(&sock, "PUT", "/v1/vm/pause", None);
    assert_eq!(
        (p.status, p.json()["vm"].clone()),
        (200, "paused".into()),
        "{p:?}"
    );
    assert_eq!(api(&sock, "GET", "/v1/status", None).json()["vm"], "paused");
    guest
        .set_request_timeout(Duration::from_secs(1))
        .expect("timeout");
    let while_paused = guest.incr("c");
    assert!(
        while_paused.is_err(),
        "the guest answered INCR ({while_paused:?}) while paused"
    );
    let r = api(&sock, "PUT", "/v1/vm/resume", None);
    assert_eq!(
        (r.status, r.json()["vm"].clone()),
        (200, "running".into()),
        "{r:?}"
    );
    let mut guest =
        GuestClient::connect_retry(topo.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            vm.ensure_running()
        })
        .expect("guest service after resume");
    let after = guest.incr("c").expect("INCR after resume");
    assert!(
        (2..=3).contains(&after),
        "INCR after resume returned {after} (1 before; the one sent while paused may have \
         been taken when the VM resumed)"
    );

    // Snapshot, where the body says (absolute).
    let snap = dir.join("snap-a");
    let body = serde_json::json!({"dir": snap}).to_string();
    let s = api(&sock, "PUT", "/v1/vm/snapshot", Some(&body));
    assert_eq!(s.status, 200, "{s:?}");
    let sv = s.json();
    assert!(sv["pages"].as_u64().unwrap_or(0) > 0, "{sv}");
    assert_eq!(sv["dir"], snap.display().to_string(), "{sv}");
    assert!(
        !files_in(&snap).is_empty(),
        "no files in {}",
        snap.display()
    );

    // Events: the finished list, with the next sequence number in a header.
    let ev = api(&sock, "GET", "/v1/events?since=0", None);
    assert_eq!(ev.status, 200, "{ev:?}");
    assert!(
        ev.headers.contains("content-type: application/x-ndjson"),
        "{ev:?}"
    );
    let next: u64 = ev
        .headers
        .lines()
        .find_map(|l| l.strip_prefix("twin-next-seq:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no twin-next-seq header: {ev:?}"));
    let names = event_names(&ev.body);
    assert!(
        names.iter().any(|n| n == "vm_running") && names.iter().any(|n| n == "snapshot_written"),
        "events {names:?}"
    );
    let last_seq = ev
        .body
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["seq"].as_u64())
        .max();
    assert_eq!(
        last_seq.map(|s| s + 1),
        Some(next),
        "twin-next-seq {next} follows the last event listed: {}",
        ev.body
    );

    // A followed stream: an event that happens while curl listens arrives on it.
    let url = format!("http://localhost/v1/events?since={next}&follow=true");
    let follower = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "8", "--unix-socket"])
        .arg(&sock)
        .arg(&url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn curl -N");
    std::thread::sleep(Duration::from_millis(500));
    let snap_b = dir.join("snap-b");
    let body = serde_json::json!({"dir": snap_b, "incremental": true}).to_string();
    let s = api(&sock, "PUT", "/v1/vm/snapshot", Some(&body));
    assert_eq!(s.status, 200, "incremental snapshot: {s:?}");
    let t0 = Instant::now();
    let out = follower.wait_with_output().expect("curl -N");
    let streamed = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "followed stream ({:?} until curl's --max-time): {streamed}",
        t0.elapsed()
    );
    assert_eq!(
        event_names(&streamed),
        vec!["snapshot_written".to_string()],
        "the followed stream from {next}: {streamed:?} (curl: {})",
        String::from_utf8_lossy(&out.stderr)
    );

    // Metrics, on the socket and over TCP (--metrics), in the OpenMetrics text format.
    let m = api(&sock, "GET", "/v1/metrics", None);
    assert_eq!(m.status, 200, "{m:?}");
    for want in [
        "twin_role{role=\"standalone\"} 1",
        "twin_snapshots 2",
        "twin_status_available 1",
        "# TYPE twin_checkpoint_pause_seconds histogram",
        "# EOF",
    ] {
        assert!(
            m.body.contains(want),
            "no {want:?} in /v1/metrics:\n{}",
            m.body
        );
    }
    let url = format!("http://{METRICS_ADDR}/metrics");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            topo.vm_ns().name(),
            "curl",
            "-sS",
            "--max-time",
            "10",
            &url,
        ])
        .output()
        .expect("curl the metrics port");
    let tcp = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && tcp.contains("twin_snapshots 2") && tcp.contains("# EOF"),
        "scraping {url}: {tcp} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Errors: an HTTP status and {"error": {code, message}}.
    let cases: [ErrorCase; 7] = [
        (
            "GET",
            "/v1/nope",
            None,
            404,
            "not_found",
            "no such path /v1/nope",
        ),
        (
            "GET",
            "/status",
            None,
            404,
            "not_found",
            "every path starts with /v1/",
        ),
        (
            "GET",
            "/v1/vm/pause",
            None,
            405,
            "method_not_allowed",
            "does not take GET",
        ),
        (
            "PUT",
            "/v1/vm/snapshot",
            Some(r#"{"dir": "rel/snap"}"#),
            400,
            "bad_request",
            "is relative",
        ),
        (
            "PUT",
            "/v1/vm/snapshot",
            Some(r#"{"dir": "#),
            400,
            "bad_request",
            "malformed request",
        ),
        (
            "PUT",
            "/v1/failover",
            None,
            501,
            "not_supported",
            "not protected",
        ),
        (
            "PUT",
            "/v1/protect",
            Some(r#"{"backup": "10.0.0.9:7000"}"#),
            400,
            "bad_request",
            "key_file",
        ),
    ];
    for (method, path, body, status, code, words) in cases {
        let a = api(&sock, method, path, body);
        let (c, msg) = a.error();
        eprintln!("{method} {path}: {} {c}: {msg}", a.status);
        assert!(
            a.status == status && c == code && msg.contains(words),
            "{method} {path} {body:?}: got {a:?}, want {status} {code} saying {words:?}"
        );
    }
    // A snapshot that cannot be written (its directory exists) fails with its reason.
    let body = serde_json::json!({"dir": snap}).to_string();
    let a = api(&sock, "PUT", "/v1/vm/snapshot", Some(&body));
    let (c, msg) = a.error();
    assert!(
        a.status == 500 && c == "failed" && msg.contains(&snap.display().to_string()),
        "a snapshot into the existing {}: {a:?}",
        snap.display()
    );

    // The OpenAPI description is served as in the repo, and every path in it is routed.
    let doc = api(&sock, "GET", "/v1/openapi.yaml", None);
    let repo = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../twin/openapi.yaml"),
    )
    .expect("read twin/openapi.yaml");
    assert_eq!(doc.status, 200);
    assert_eq!(
        doc.body, repo,
        "the served OpenAPI differs from twin/openapi.yaml"
    );
    let paths: Vec<&str> = repo
        .lines()
        .filter_map(|l| l.strip_prefix("  /v1/").and_then(|p| p.strip_suffix(':')))
        .collect();
    assert!(paths.len() >= 9, "paths in openapi.yaml: {paths:?}");
    for p in paths {
        let a = api(&sock, "OPTIONS", &format!("/v1/{p}"), None);
        assert_ne!(
            a.status, 404,
            "/v1/{p} is in openapi.yaml but not routed: {a:?}"
        );
    }

    assert_eq!(guest.incr("c").expect("INCR at the end"), after + 1);
    vm.terminate().expect("SIGTERM");
    let status = vm.wait_exit(Duration::from_secs(10)).expect("exit");
    assert_eq!(status.code(), Some(0), "{}", vm.tail(20));
    assert_no_panic(&vm);
}

/// `twin snapshot snap1` run in directory A writes A/snap1, whatever the VM process's own
/// working directory (before, the VM process resolved it against its own).
#[test]
fn a_relative_snapshot_path_is_the_clients() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("api-relsnap").expect("test dir");
    let sock = dir.join("vm.sock");
    let mut vm = run_vm(&topo, &dir, "twin-run", &sock, &[]);
    let client_dir = dir.join("client-cwd");
    std::fs::create_dir(&client_dir).expect("mkdir");
    let vm_cwd = std::fs::read_link(format!("/proc/{}/cwd", vm.pid())).expect("VM's cwd");
    assert_ne!(vm_cwd, client_dir);
    let out = Command::new(twin_bin().expect("twin"))
        .args(["snapshot", "snap1", "--control"])
        .arg(&sock)
        .current_dir(&client_dir)
        .output()
        .expect("twin snapshot");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "twin snapshot snap1: {}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.status.success(), "twin snapshot snap1 failed: {stderr}");
    let want = client_dir.join("snap1");
    assert!(
        !files_in(&want).is_empty(),
        "no snapshot in {} (the client's directory); in the VM's {}: {:?}",
        want.display(),
        vm_cwd.display(),
        files_in(&vm_cwd.join("snap1"))
    );
    assert!(
        !vm_cwd.join("snap1").exists(),
        "the snapshot was (also) written in the VM process's directory"
    );
    // And it restores: `twin restore` takes it (the parse-time check accepts it).
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("twin snapshot prints the outcome as JSON");
    assert_eq!(v["dir"], want.display().to_string());
    vm.terminate().expect("SIGTERM");
    vm.wait_exit(Duration::from_secs(10)).expect("exit");
    assert_no_panic(&vm);
}

/// A snapshot slower than the 30 s the server gives the main loop (a slow disk, the
/// `twin.snapshot=sleep(35000)` failpoint): the client prints progress and then the real
/// outcome; other requests meanwhile answer `busy` at once, naming the operation. Before,
/// the client got "did not answer" after 30 s while the snapshot went on.
#[test]
fn a_long_snapshot_reports_progress_and_its_real_outcome() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("api-longsnap").expect("test dir");
    let sock = dir.join("vm.sock");
    let mut vm = run_vm(
        &topo,
        &dir,
        "twin-run",
        &sock,
        &[("TWIN_FAILPOINTS", "twin.snapshot=sleep(35000)")],
    );
    let snap = dir.join("slow-snap");
    let t0 = Instant::now();
    let client = Command::new(twin_bin().expect("twin"))
        .arg("snapshot")
        .arg(&snap)
        .arg("--control")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("twin snapshot");
    std::thread::sleep(Duration::from_secs(2));
    // Meanwhile: busy, at once, through the CLI and through curl.
    let t = Instant::now();
    let st = Command::new(twin_bin().expect("twin"))
        .args(["status", "--control"])
        .arg(&sock)
        .output()
        .expect("twin status");
    let took = t.elapsed();
    let msg = String::from_utf8_lossy(&st.stderr);
    eprintln!("twin status during the snapshot ({took:?}): {msg}");
    assert!(
        !st.status.success() && msg.contains("taking a snapshot") && took < Duration::from_secs(5),
        "twin status during a long snapshot: {msg:?} after {took:?}"
    );
    let a = api(&sock, "GET", "/v1/status", None);
    let (code, m) = a.error();
    assert!(
        a.status == 409 && code == "busy" && m.contains("taking a snapshot"),
        "{a:?}"
    );

    let out = client.wait_with_output().expect("twin snapshot ends");
    let elapsed = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "twin snapshot after {elapsed:?}:\n{stderr}{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        out.status.success(),
        "the long snapshot's client failed after {elapsed:?}: {stderr}"
    );
    assert!(
        elapsed > Duration::from_secs(35),
        "the failpoint did not hold the snapshot ({elapsed:?})"
    );
    let progress = stderr.matches("still writing").count();
    assert!(
        progress >= 5,
        "{progress} progress lines in 35 s:\n{stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("outcome JSON");
    assert!(v["pages"].as_u64().unwrap_or(0) > 0, "{v}");
    assert!(
        !files_in(&snap).is_empty(),
        "no snapshot written in {}",
        snap.display()
    );
    // And the server answers again.
    assert_eq!(api(&sock, "GET", "/v1/status", None).json()["snapshots"], 1);
    vm.terminate().expect("SIGTERM");
    vm.wait_exit(Duration::from_secs(10)).expect("exit");
    assert_no_panic(&vm);
}

/// What `twin ARGS` does within a few seconds: exit code and stderr.
fn twin_quick(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(twin_bin().expect("twin"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("TWIN_LOG")
        .env_remove("TWIN_LOG_FORMAT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn twin");
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .expect("stderr")
                .read_to_string(&mut err)
                .expect("read stderr");
            return (status.code(), err);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("twin {args:?} still runs after 10 s: it should have refused its arguments");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks that can be made when the arguments are parsed are made there: exit 2 and a
/// message in the unit the user typed, before anything starts.
#[test]
fn bad_arguments_fail_at_parse_time_with_exit_2() {
    require_root();
    let dir = TestDir::new("api-args").expect("test dir");
    let key = dir.key_file();
    let a_dir = dir.path().display().to_string();
    let run = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["run", "--control"].iter().map(|s| s.to_string()).collect();
        v.push(dir.join("x.sock").display().to_string());
        v.extend(extra.iter().map(|s| s.to_string()));
        if !extra.contains(&"--tap") {
            v.extend(["--tap".into(), "tap-nonexistent".into()]);
        }
        v
    };
    let protect = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["protect".into(), "--key-file".into(), key.clone()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (run(&["--mem", "3M"]), "3M must be a multiple of 2M"),
        (run(&["--mem", "0"]), "must be a multiple of 2M"),
        (run(&["--vcpus", "0"]), "1..=64"),
        (run(&["--vcpus", "65"]), "1..=64"),
        (run(&["--tap", "lo"]), "lo is not a TAP device"),
        (run(&["--mac", "01:00:5e:00:00:01"]), "multicast"),
        (
            vec!["status".into(), "--control".into(), a_dir.clone()],
            "is a directory",
        ),
        (
            vec![
                "restore".into(),
                a_dir.clone(),
                "--tap".into(),
                "tap0".into(),
            ],
            "is not a Twin snapshot",
        ),
        (
            protect(&[
                "--backup",
                "10.0.0.3:7000",
                "--tap",
                "tap0",
                "--interval",
                "0ms",
            ]),
            "must be positive",
        ),
        (
            protect(&["--backup", "nohost", "--tap", "tap0"]),
            "is not HOST:PORT",
        ),
    ];
    for (args, want) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = twin_quick(&args, &[]);
        eprintln!("twin {}: exit {code:?}: {}", args.join(" "), err.trim());
        assert!(
            code == Some(2) && err.contains(want),
            "twin {args:?}: exit {code:?}, stderr {err:?}; want exit 2 saying {want:?}"
        );
    }

    // A backup whose name does not resolve is an error at start, not a retry loop.
    let (code, err) = twin_quick(
        &protect(&[
            "--backup",
            "nohost.invalid:7000",
            "--tap",
            "tap-nonexistent",
        ])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
        &[],
    );
    eprintln!(
        "--backup nohost.invalid:7000: exit {code:?}: {}",
        err.trim()
    );
    assert!(
        code.is_some_and(|c| c != 0) && err.contains("does not resolve"),
        "--backup nohost.invalid:7000: exit {code:?}: {err:?}"
    );

    // An invalid TWIN_LOG is an error, not silently `info`; so is an unknown format.
    let (code, err) = twin_quick(&["status"], &[("TWIN_LOG", "info,twin=[bogus")]);
    assert!(
        code == Some(2) && err.contains("TWIN_LOG"),
        "TWIN_LOG=info,twin=[bogus: exit {code:?}: {err:?}"
    );
    let (code, err) = twin_quick(&["status"], &[("TWIN_LOG_FORMAT", "xml")]);
    assert!(
        code == Some(2) && err.contains("TWIN_LOG_FORMAT"),
        "TWIN_LOG_FORMAT=xml: exit {code:?}: {err:?}"
    );

    // --kernel/--initrd are hidden until supported (and refused if given).
    let help = Command::new(twin_bin().expect("twin"))
        .args(["run", "--help"])
        .output()
        .expect("twin run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--mem") && !help.contains("--kernel") && !help.contains("--initrd"));
}
