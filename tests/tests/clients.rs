//! Real Redis clients (Debian's `redis-tools`, unmodified) against a protected VM's built-in
//! guest, which speaks RESP2 on port 6379, across a SIGKILL of the primary:
//!
//! - one `redis-cli` process, one connection, `INCR` after `INCR`: every reply is the one
//!   before plus one, before, across and after the failover;
//! - `redis-benchmark` with 64 connections, INCR on 1000 random keys: it finishes without an
//!   error, and the keys' values add up to exactly the requests it counted as answered (none
//!   lost, none applied twice).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use twin_lab::rig::*;
use twin_lab::*;

const REDIS_PORT: &str = "6379";
/// One request across a failover: the client's TCP retransmission carries it to the backup.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn require_redis_tools() {
    assert!(
        have("redis-cli") && have("redis-benchmark"),
        "redis-cli and redis-benchmark are needed (apt-get install redis-tools; .ci/run does)"
    );
}

/// A `redis-cli` in the client's namespace reading commands from a pipe, one reply per line
/// (with its output not a terminal, redis-cli prints replies raw).
struct RedisCli {
    child: Child,
    stdin: ChildStdin,
    replies: std::sync::mpsc::Receiver<String>,
}

impl RedisCli {
    fn start(ns: &Netns) -> RedisCli {
        let guest = GUEST_ADDR.to_string();
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "redis-cli", "-h", &guest, "-p"])
            .arg(REDIS_PORT)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn redis-cli");
        let stdin = child.stdin.take().expect("stdin");
        let stdout: ChildStdout = child.stdout.take().expect("stdout");
        let (tx, replies) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        RedisCli {
            child,
            stdin,
            replies,
        }
    }

    fn call(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("write to redis-cli");
        self.stdin.flush().expect("flush");
        self.replies
            .recv_timeout(REPLY_TIMEOUT)
            .unwrap_or_else(|e| panic!("no reply to {command:?} within {REPLY_TIMEOUT:?}: {e}"))
    }
}

impl Drop for RedisCli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `INCR`s on one connection until `n` more replies came; each must be the last plus one.
fn incr_run(cli: &mut RedisCli, last: &mut i64, n: u32, gaps: &mut Vec<Duration>) {
    for _ in 0..n {
        let t = Instant::now();
        let reply = cli.call("INCR rk");
        let v: i64 = reply
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("INCR answered {reply:?} after {last}"));
        assert_eq!(v, *last + 1, "INCR rk jumped from {last} to {v}");
        *last = v;
        gaps.push(t.elapsed());
    }
}

#[test]
fn redis_cli_across_failover() {
    require_redis_tools();
    let mut rep = Report::new("redis_cli_across_failover");
    let mut rig = Rig::start(&mut rep, Opts::default());
    rep.step("redis-cli: INCR rk on one connection");
    let mut cli = RedisCli::start(rig.ha.client_ns());
    let mut last = 0;
    let mut gaps = Vec::new();
    incr_run(&mut cli, &mut last, 200, &mut gaps);
    rep.step("SIGKILL of the primary between two INCRs");
    let killed_at = Instant::now();
    let status = rig.primary.kill().expect("kill the primary");
    assert!(killed_by_sigkill(status), "primary ended {status:?}");
    gaps.clear();
    incr_run(&mut cli, &mut last, 1, &mut gaps);
    let first = killed_at.elapsed();
    rig.wait_failover(&mut rep);
    incr_run(&mut cli, &mut last, 200, &mut gaps);
    assert_eq!(cli.call("GET rk").trim(), last.to_string());
    rep.note(format!(
        "first reply {:.0} ms after the SIGKILL; {last} INCRs, every reply the last plus one",
        first.as_secs_f64() * 1e3
    ));
    rig.assert_no_panics();
    rep.done("redis-cli's connection and values continuous across the failover");
}

/// The keys redis-benchmark's `-r 1000` INCRs (`counter:__rand_int__`, twelve digits).
fn counter_keys() -> Vec<String> {
    (0..1000).map(|i| format!("counter:{i:012}")).collect()
}

#[test]
fn redis_benchmark_64_connections_across_sigkill() {
    require_redis_tools();
    const REQUESTS: u64 = 200_000;
    let mut rep = Report::new("redis_benchmark_64_connections_across_sigkill");
    let mut rig = Rig::start(&mut rep, Opts::default());
    rep.step("redis-benchmark: 64 connections, INCR on 1000 keys");
    let guest = GUEST_ADDR.to_string();
    let n = REQUESTS.to_string();
    let mut bench = TwinProcess::spawn_program(
        rig.ha.client_ns(),
        &rig.dir,
        "redis-benchmark",
        std::path::Path::new("/usr/bin/redis-benchmark"),
        &[
            "-h", &guest, "-p", REDIS_PORT, "-c", "64", "-n", &n, "-r", "1000", "-t", "incr", "-q",
            "--csv",
        ],
        &[],
    )
    .expect("spawn redis-benchmark");
    // Kill once it is well under way: its connections are open and INCRs in flight.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        bench.try_status().expect("status").is_none(),
        "redis-benchmark ended before the kill (raise REQUESTS): {}",
        bench.text(Stream::Stdout)
    );
    rep.step("SIGKILL of the primary under load");
    let status = rig.primary.kill().expect("kill the primary");
    assert!(killed_by_sigkill(status), "primary ended {status:?}");
    rig.wait_failover(&mut rep);
    let done = match bench.wait_exit(Duration::from_secs(90)) {
        Ok(s) => s,
        Err(e) => {
            let ns = rig.ha.client_ns();
            let info =
                ns.enter(|| RespClient::connect((GUEST_ADDR, 6379).into())?.call_bulk(&["INFO"]));
            let ss = ns.run(&["ss", "-tanoi"]);
            panic!("redis-benchmark does not finish on the backup: {e}\nguest INFO: {info:?}\nss: {ss:?}");
        }
    };
    let out = bench.text(Stream::Stdout);
    let err = bench.text(Stream::Stderr);
    assert!(
        done.success(),
        "redis-benchmark failed: {done:?}\n{out}\n{err}"
    );
    assert!(
        !out.contains("Error") && !err.contains("Error"),
        "redis-benchmark saw errors:\n{out}\n{err}"
    );
    rep.note(format!(
        "redis-benchmark: {}",
        out.lines().last().unwrap_or_default().trim()
    ));
    rep.step("reading every key back");
    let sum = rig
        .ha
        .client_ns()
        .enter(|| {
            let mut c = RespClient::connect((GUEST_ADDR, 6379).into()).expect("connect");
            let mut sum = 0u64;
            for chunk in counter_keys().chunks(50) {
                let mut args = vec!["MGET".to_string()];
                args.extend(chunk.iter().cloned());
                for v in c.mget(&args).expect("MGET") {
                    sum += v.map_or(0, |v| v.parse::<u64>().expect("a counter"));
                }
            }
            sum
        })
        .expect("enter the client namespace");
    assert_eq!(
        sum, REQUESTS,
        "the counters add up to {sum}, but redis-benchmark had {REQUESTS} INCRs answered"
    );
    rep.note(format!(
        "1000 keys add up to {sum}: no INCR lost or applied twice"
    ));
    rig.assert_no_panics();
    rep.done("64 connections across the failover, every acknowledged INCR kept once");
}

/// A minimal RESP2 client for reading results back (`MGET` of bulk strings).
struct RespClient {
    r: BufReader<std::net::TcpStream>,
}

impl RespClient {
    fn connect(addr: std::net::SocketAddr) -> std::io::Result<RespClient> {
        let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(RespClient {
            r: BufReader::new(s),
        })
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut l = String::new();
        self.r.read_line(&mut l)?;
        Ok(l.trim_end().to_string())
    }

    /// Sends one command.
    fn send(&mut self, args: &[String]) -> std::io::Result<()> {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.r.get_mut().write_all(req.as_bytes())
    }

    /// One bulk string after its `$` header line (`None` for the null bulk string).
    fn bulk(&mut self, header: &str) -> std::io::Result<Option<String>> {
        if header == "$-1" {
            return Ok(None);
        }
        let len: usize = header
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .filter(|&n| n <= 1 << 20)
            .ok_or_else(|| std::io::Error::other(format!("bulk header {header:?}")))?;
        let mut buf = vec![0; len + 2];
        std::io::Read::read_exact(&mut self.r, &mut buf)?;
        buf.truncate(len);
        String::from_utf8(buf)
            .map(Some)
            .map_err(|e| std::io::Error::other(format!("bulk string: {e}")))
    }

    /// A command answered with a bulk string (`INFO`).
    fn call_bulk(&mut self, args: &[&str]) -> std::io::Result<String> {
        self.send(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())?;
        let head = self.line()?;
        Ok(self.bulk(&head)?.unwrap_or_default())
    }

    fn mget(&mut self, args: &[String]) -> std::io::Result<Vec<Option<String>>> {
        self.send(args)?;
        let head = self.line()?;
        let n: usize = head
            .strip_prefix('*')
            .and_then(|n| n.parse().ok())
            .filter(|&n| n <= args.len())
            .ok_or_else(|| std::io::Error::other(format!("MGET answered {head:?}")))?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let h = self.line()?;
            out.push(self.bulk(&h)?);
        }
        Ok(out)
    }
}
