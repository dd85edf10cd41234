//! Real processes under test: the `twin` binary (or any program) started inside a namespace,
//! its output captured to files and watched line by line, real signals, bounded waits.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::cmd::configure_child;
use crate::error::{HarnessError, Result};
use crate::netns::{unique_name, Netns};
use crate::sys::PidFd;

/// A per-test directory under the system temp dir, named `twt-<pid>-<n>-<label>`. Removed on
/// drop, except while the test panics: then it is kept (and named on stderr) for inspection;
/// [`crate::cleanup_stale`] removes it once this process is gone.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates a fresh directory.
    pub fn new(label: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(unique_name(label));
        std::fs::create_dir_all(&path)
            .map_err(|e| HarnessError::io(format!("creating {}", path.display()), e))?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// The replication key of the test's primary/backup pair (`twin.key` here, written by
    /// the first call, mode 0600 as `twin keygen` writes it): pass it as `--key-file`.
    pub fn key_file(&self) -> String {
        let path = self.join("twin.key");
        if !path.exists() {
            twin_link::Key::generate()
                .and_then(|k| k.write_new(&path))
                .unwrap_or_else(|e| panic!("writing the test key: {e}"));
        }
        path.to_string_lossy().into_owned()
    }

    /// The link configuration the test's pair uses (for a proxy in the middle).
    pub fn link_config(&self) -> twin_link::LinkConfig {
        let key = twin_link::Key::load(Path::new(&self.key_file()))
            .unwrap_or_else(|e| panic!("reading the test key: {e}"));
        twin_link::LinkConfig::with_key(key, false)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("twin-tests: keeping {} for inspection", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Finds the `twin` binary: `$TWIN_BIN`; `$CARGO_BIN_EXE_twin`; `twin` next to the running
/// executable (the `twin-lab` binary); `twin` in the same target profile directory as the
/// running test executable (which follows `CARGO_TARGET_DIR` and `--release`); then
/// `<workspace>/target/{release,debug}/twin`, the profile of this build first.
pub fn twin_bin() -> Result<PathBuf> {
    let mut searched = Vec::new();
    for var in ["TWIN_BIN", "CARGO_BIN_EXE_twin"] {
        if let Some(p) = std::env::var_os(var) {
            let p = PathBuf::from(p);
            if p.is_file() {
                return Ok(p);
            }
            searched.push(p);
        }
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // <target>/<profile>/twin-lab
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("twin"));
        }
        // <target>/<profile>/deps/<test>-<hash>
        if let Some(profile_dir) = exe.parent().and_then(Path::parent) {
            candidates.push(profile_dir.join("twin"));
        }
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let profiles = if cfg!(debug_assertions) {
        ["debug", "release"]
    } else {
        ["release", "debug"]
    };
    candidates.extend(profiles.iter().map(|p| target.join(p).join("twin")));
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
        searched.push(c);
    }
    Err(HarnessError::BinaryNotFound { searched })
}

/// Signals the harness sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: orderly shutdown.
    Term,
    /// SIGKILL: sudden death (a crashed host).
    Kill,
    /// SIGINT: Ctrl-C.
    Int,
    /// SIGHUP.
    Hup,
    /// SIGSTOP: freeze (a hung host).
    Stop,
    /// SIGCONT: thaw.
    Cont,
}

impl Signal {
    fn raw(self) -> libc::c_int {
        match self {
            Self::Term => libc::SIGTERM,
            Self::Kill => libc::SIGKILL,
            Self::Int => libc::SIGINT,
            Self::Hup => libc::SIGHUP,
            Self::Stop => libc::SIGSTOP,
            Self::Cont => libc::SIGCONT,
        }
    }
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A position in a process's output, from [`TwinProcess::mark`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Mark(usize);

#[derive(Debug, Default)]
struct LogState {
    /// Every line from both streams, in arrival order.
    lines: Vec<(Stream, String)>,
    /// Streams not yet at end of file.
    open: u8,
}

impl LogState {
    /// The first line at or after index `from` satisfying `pred`, with the mark past it.
    fn find_after(&self, from: usize, pred: impl Fn(&str) -> bool) -> Option<(Mark, String)> {
        self.lines
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, (_, l))| pred(l))
            .map(|(i, (_, l))| (Mark(i + 1), l.clone()))
    }
}

#[derive(Debug, Default)]
struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        // A reader thread cannot panic while holding the lock; recover anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn spawn_reader(
    pipe: impl Read + Send + 'static,
    mut file: File,
    stream: Stream,
    log: Arc<Log>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _ = file.write_all(&buf);
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    log.lock().lines.push((stream, line));
                    log.changed.notify_all();
                }
            }
        }
        let _ = file.flush();
        log.lock().open -= 1;
        log.changed.notify_all();
    })
}

/// How a process that ran to completion ended, with its whole output.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Its exit status.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl Finished {
    /// Non-empty lines of stdout and stderr together.
    pub fn nonempty_lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .chain(self.stderr.lines())
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

/// A process under test, started in a namespace. Killed (SIGKILL) and reaped on drop if
/// still running; while a test panics its last output lines are printed.
#[derive(Debug)]
pub struct TwinProcess {
    name: String,
    child: Child,
    pidfd: PidFd,
    status: Option<ExitStatus>,
    log: Arc<Log>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    ns: Netns,
}

/// How many lines of output error messages and panic reports show.
const TAIL_LINES: usize = 30;
/// How long to wait for the output pipes to drain after the process has exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Panics if `p` printed a Rust panic message (on either stream).
pub fn assert_no_panic(p: &TwinProcess) {
    let all = format!("{}{}", p.text(Stream::Stdout), p.text(Stream::Stderr));
    assert!(
        !all.contains("panicked"),
        "{} panicked:\n{}",
        p.name(),
        all.lines()
            .filter(|l| l.contains("panicked") || l.contains("at "))
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The last lines of each process, for failure messages.
pub fn tails(procs: &[&TwinProcess]) -> String {
    procs
        .iter()
        .map(|p| {
            format!(
                "--- {} (pid {}) last output ---\n{}",
                p.name(),
                p.pid(),
                p.tail(25)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// How a process enters its network namespace.
#[derive(Clone, Copy)]
enum Launch {
    IpNetnsExec,
    Nsenter,
}

impl TwinProcess {
    /// Starts the `twin` binary (see [`twin_bin`]) with `args` inside `ns`; output goes to
    /// `<dir>/<name>.stdout` and `<dir>/<name>.stderr`.
    pub fn spawn(ns: &Netns, dir: &TestDir, name: &str, args: &[&str]) -> Result<Self> {
        Self::spawn_program(ns, dir, name, &twin_bin()?, args, &[])
    }

    /// Starts `program` with `args` and extra environment `env` inside `ns`, via
    /// `ip netns exec` (so `/sys` shows the namespace's interfaces).
    pub fn spawn_program(
        ns: &Netns,
        dir: &TestDir,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::launch(ns, dir, name, program, args, env, Launch::IpNetnsExec)
    }

    /// [`TwinProcess::spawn_program`] via `nsenter --net`, which enters the network
    /// namespace only and leaves `/sys` as the host mounts it (as systemd's
    /// `NetworkNamespacePath=` does): the process sees the host's cgroup file systems.
    pub fn spawn_program_nsenter(
        ns: &Netns,
        dir: &TestDir,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::launch(ns, dir, name, program, args, env, Launch::Nsenter)
    }

    fn launch(
        ns: &Netns,
        dir: &TestDir,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        how: Launch,
    ) -> Result<Self> {
        let stdout_path = dir.join(format!("{name}.stdout"));
        let stderr_path = dir.join(format!("{name}.stderr"));
        let create = |p: &Path| {
            File::create(p).map_err(|e| HarnessError::io(format!("creating {}", p.display()), e))
        };
        let (out_file, err_file) = (create(&stdout_path)?, create(&stderr_path)?);
        // `ip netns exec` (which execs the program in place: the pid is the program's) rather
        // than a bare setns, so that /sys is remounted for the namespace as a user running
        // `ip netns exec … twin` would have it.
        let mut cmd = match how {
            Launch::IpNetnsExec => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.name()]);
                c
            }
            Launch::Nsenter => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{}", ns.name())).arg("--");
                c
            }
        };
        cmd.arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("RUST_BACKTRACE", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        configure_child(&mut cmd, None, true);
        let mut child = cmd.spawn().map_err(|e| {
            HarnessError::io(
                format!("spawning {} ({}) in {}", name, program.display(), ns.name()),
                e,
            )
        })?;
        let pidfd = match PidFd::open(child.id()) {
            Ok(p) => p,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HarnessError::io("pidfd_open", e));
            }
        };
        let log = Arc::new(Log::default());
        log.lock().open = 2;
        let out = child.stdout.take().expect("stdout is piped");
        let err = child.stderr.take().expect("stderr is piped");
        spawn_reader(out, out_file, Stream::Stdout, log.clone());
        spawn_reader(err, err_file, Stream::Stderr, log.clone());
        Ok(Self {
            name: name.to_string(),
            child,
            pidfd,
            status: None,
            log,
            stdout_path,
            stderr_path,
            ns: ns.clone(),
        })
    }

    /// Runs the `twin` binary with `args` in `ns` to completion, at most `timeout` (then it
    /// is killed and this is a timeout error).
    pub fn run_to_exit(
        ns: &Netns,
        dir: &TestDir,
        name: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Finished> {
        let mut p = Self::spawn(ns, dir, name, args)?;
        let status = p.wait_exit(timeout)?;
        Ok(Finished {
            status,
            stdout: p.text(Stream::Stdout),
            stderr: p.text(Stream::Stderr),
        })
    }

    /// The label given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The namespace it runs in.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// Where its standard output is written.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    /// Where its standard error is written.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// The current end of the output: [`Self::wait_for_line_after`] with it sees only lines
    /// printed from now on.
    pub fn mark(&self) -> Mark {
        Mark(self.log.lock().lines.len())
    }

    /// Everything printed so far on `stream`, one `\n`-terminated line each.
    pub fn text(&self, stream: Stream) -> String {
        self.log
            .lock()
            .lines
            .iter()
            .filter(|(s, _)| *s == stream)
            .map(|(_, l)| format!("{l}\n"))
            .collect()
    }

    /// The last `n` lines of output, both streams, tagged.
    pub fn tail(&self, n: usize) -> String {
        let state = self.log.lock();
        let start = state.lines.len().saturating_sub(n);
        state.lines[start..]
            .iter()
            .map(|(s, l)| {
                let tag = match s {
                    Stream::Stdout => "out",
                    Stream::Stderr => "err",
                };
                format!("  [{tag}] {l}\n")
            })
            .collect()
    }

    /// Waits until a line (on either stream) contains `pattern`; returns the line.
    pub fn wait_for_line(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        self.wait_for_line_after(Mark(0), pattern, timeout)
            .map(|(_, l)| l)
    }

    /// Waits until a line printed after `mark` contains `pattern`; returns the mark just past
    /// it (to wait for the next one) and the line.
    pub fn wait_for_line_after(
        &mut self,
        mark: Mark,
        pattern: &str,
        timeout: Duration,
    ) -> Result<(Mark, String)> {
        self.wait_for(
            mark,
            &format!("a line containing {pattern:?}"),
            timeout,
            |l| l.contains(pattern),
        )
    }

    /// Waits until a line printed after `mark` satisfies `pred`; `what` describes it for
    /// error messages.
    pub fn wait_for(
        &mut self,
        mark: Mark,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(Mark, String)> {
        let deadline = Instant::now() + timeout;
        let mut next = mark.0;
        let exited = {
            let mut state = self.log.lock();
            loop {
                if let Some(found) = state.find_after(next, &pred) {
                    return Ok(found);
                }
                next = state.lines.len();
                let left = deadline.saturating_duration_since(Instant::now());
                if state.open == 0 || left.is_zero() {
                    break state.open == 0;
                }
                // Woken by every new line; the slice bounds how late an exit that leaves the
                // pipes open (a surviving grandchild) is noticed.
                state = self
                    .log
                    .changed
                    .wait_timeout(state, left.min(Duration::from_millis(250)))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                if state.lines.len() == next && self.child_exited_now() {
                    break true;
                }
            }
        };
        if exited {
            // Lines may still have been in the pipes when the exit was seen: drain, look again.
            let _ = self.wait_exit(Duration::from_secs(2));
            if let Some(found) = self.log.lock().find_after(next, &pred) {
                return Ok(found);
            }
            Err(self.exited_error(what))
        } else {
            Err(HarnessError::Timeout {
                what: format!(
                    "{what} from {}; last output:\n{}",
                    self.name,
                    self.tail(TAIL_LINES)
                ),
                after: timeout,
            })
        }
    }

    /// Non-blocking check whether the process has exited (without reaping it).
    fn child_exited_now(&self) -> bool {
        self.status.is_some() || self.pidfd.wait_exited(Duration::ZERO).unwrap_or(false)
    }

    fn exited_error(&mut self, what: &str) -> HarnessError {
        // Give it a moment to be reapable if only the pipes closed so far.
        let status = match self.wait_exit(Duration::from_secs(2)) {
            Ok(s) => describe_status(s),
            Err(_) => "still running, output closed".to_string(),
        };
        HarnessError::ProcessExited {
            name: self.name.clone(),
            status,
            what: what.to_string(),
            tail: self.tail(TAIL_LINES),
        }
    }

    /// The exit status if the process has exited (reaping it), `None` if it runs.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(|e| HarnessError::io(format!("checking on {}", self.name), e))?;
            if self.status.is_some() {
                self.drain_output();
            }
        }
        Ok(self.status)
    }

    /// `Ok(())` while the process runs; a [`HarnessError::ProcessExited`] with its last output
    /// once it has exited. Handy as the liveness check of a retry loop.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.try_status()? {
            None => Ok(()),
            Some(_) => Err(self.exited_error("it to keep running")),
        }
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        if self.status.is_some() {
            return Err(HarnessError::InvalidArgument(format!(
                "cannot signal {}: it has already exited",
                self.name
            )));
        }
        self.pidfd
            .send_signal(signal.raw())
            .map_err(|e| HarnessError::io(format!("sending {signal:?} to {}", self.name), e))
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) -> Result<()> {
        self.signal(Signal::Term)
    }

    /// Sends SIGKILL and waits for the process to be gone.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.try_status()? {
            return Ok(s);
        }
        self.signal(Signal::Kill)?;
        self.wait_exit(Duration::from_secs(10))
    }

    /// Waits at most `timeout` for the process to exit and reaps it; a timeout error leaves
    /// it running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let exited = self
            .pidfd
            .wait_exited(timeout)
            .map_err(|e| HarnessError::io(format!("waiting for {}", self.name), e))?;
        if !exited {
            return Err(HarnessError::Timeout {
                what: format!(
                    "{} to exit; last output:\n{}",
                    self.name,
                    self.tail(TAIL_LINES)
                ),
                after: timeout,
            });
        }
        let status = self
            .child
            .wait()
            .map_err(|e| HarnessError::io(format!("reaping {}", self.name), e))?;
        self.status = Some(status);
        self.drain_output();
        Ok(status)
    }

    /// After exit, waits (bounded) until both output pipes reach end of file so that every
    /// line is in the log.
    fn drain_output(&self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut state = self.log.lock();
        while state.open > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .log
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for TwinProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.pidfd.send_signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "twin-tests: {} (pid {}, {}) last output ({}, {}):\n{}",
                self.name,
                self.child.id(),
                self.status
                    .map_or_else(|| "killed by the harness".to_string(), describe_status),
                self.stdout_path.display(),
                self.stderr_path.display(),
                self.tail(TAIL_LINES)
            );
        }
    }
}

/// "exit code 3" / "killed by signal 9".
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// `twin status --json` of the twin process whose control socket is `control`, run in `ns`;
/// `Err` says what went wrong (did not finish, failed, printed no JSON).
pub fn twin_status(
    ns: &Netns,
    dir: &TestDir,
    control: &Path,
    timeout: Duration,
) -> std::result::Result<serde_json::Value, String> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let control = control.to_string_lossy().into_owned();
    let done = TwinProcess::run_to_exit(
        ns,
        dir,
        &format!("twin-status-{n}"),
        &["status", "--json", "--control", &control],
        timeout,
    )
    .map_err(|e| format!("twin status did not finish: {e}"))?;
    if !done.status.success() {
        return Err(format!(
            "twin status failed ({}): {}",
            describe_status(done.status),
            format!("{}{}", done.stdout, done.stderr).trim()
        ));
    }
    serde_json::from_str(done.stdout.trim())
        .map_err(|e| format!("twin status printed no JSON ({e}): {:?}", done.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_dir_is_removed_on_drop() {
        let dir = TestDir::new("unit").expect("dir");
        let path = dir.path().to_path_buf();
        std::fs::write(dir.join("f"), "x").expect("write");
        assert!(path.is_dir());
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn twin_bin_is_a_file_or_the_error_names_where_it_looked() {
        let err = match twin_bin() {
            Ok(p) => {
                assert!(p.is_file());
                return;
            }
            Err(e) => e,
        };
        assert!(err.to_string().contains("target"), "{err}");
    }

    #[test]
    fn statuses_are_described() {
        assert_eq!(describe_status(ExitStatus::from_raw(3 << 8)), "exit code 3");
        assert_eq!(
            describe_status(ExitStatus::from_raw(9)),
            "killed by signal 9"
        );
    }

    #[test]
    fn finished_lines_skip_blanks() {
        let f = Finished {
            status: ExitStatus::from_raw(0),
            stdout: "a\n\n".into(),
            stderr: "  \nb\n".into(),
        };
        assert_eq!(f.nonempty_lines(), vec!["a", "b"]);
    }
}
