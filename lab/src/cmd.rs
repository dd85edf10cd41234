//! Running helper commands (`ip`, `tc`, `nft`, `ping`, …), optionally inside a network
//! namespace, always with a time limit.

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{HarnessError, Result};
use crate::sys::{self, PidFd};

/// The time limit for helper commands unless a caller gives another.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// What a finished command printed and how it ended.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// How it ended.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Prepares `cmd` to run in the network namespace `netns_fd` (if any) and, if
/// `die_with_parent`, to be killed when the thread that spawned it goes away (so that a test
/// process killed by a timeout leaves no VMM behind).
pub(crate) fn configure_child(cmd: &mut Command, netns_fd: Option<RawFd>, die_with_parent: bool) {
    // SAFETY: `getpid` cannot fail.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec. It only makes raw syscalls (`prctl`,
    // `getppid`, `setns`), which are async-signal-safe, and builds an `io::Error` from errno,
    // which does not allocate. `netns_fd` stays open in the parent until `spawn` returns, so
    // it is valid in the child.
    unsafe {
        cmd.pre_exec(move || {
            if die_with_parent {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    // The parent died before prctl took effect.
                    libc::_exit(1);
                }
            }
            if let Some(fd) = netns_fd {
                sys::setns_net(fd)?;
            }
            Ok(())
        });
    }
}

fn reader<R: Read + Send + 'static>(mut r: R) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error just ends the capture; the exit status tells the story.
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Kills `child` (if it still runs) and reaps it.
fn kill_and_reap(child: &mut Child, pidfd: &PidFd) {
    let _ = pidfd.send_signal(libc::SIGKILL);
    let _ = child.wait();
}

/// Runs `argv` to completion (inside the namespace `netns`, given as `(name, fd)`), feeding it
/// `stdin`, killing it after `timeout`.
pub(crate) fn run(
    netns: Option<(&str, RawFd)>,
    argv: &[&str],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<CmdOutput> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| HarnessError::InvalidArgument("empty command line".into()))?;
    let line = argv.join(" ");
    let where_ = netns.map_or("host", |(name, _)| name);
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C");
    configure_child(&mut cmd, netns.map(|(_, fd)| fd), true);
    let mut child = cmd
        .spawn()
        .map_err(|e| HarnessError::io(format!("spawning `{line}` in {where_}"), e))?;
    let pidfd = match PidFd::open(child.id()) {
        Ok(p) => p,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HarnessError::io("pidfd_open", e));
        }
    };
    let out = reader(child.stdout.take().expect("stdout is piped"));
    let err = reader(child.stderr.take().expect("stderr is piped"));
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Inputs are small (nft rule sets); a failed write shows up in the exit status.
        let _ = pipe.write_all(data.as_bytes());
    }
    let exited = match pidfd.wait_exited(timeout) {
        Ok(e) => e,
        Err(e) => {
            kill_and_reap(&mut child, &pidfd);
            return Err(HarnessError::io("waiting for a command", e));
        }
    };
    if !exited {
        kill_and_reap(&mut child, &pidfd);
        return Err(HarnessError::Timeout {
            what: format!("`{line}` in {where_}"),
            after: timeout,
        });
    }
    let status = child
        .wait()
        .map_err(|e| HarnessError::io(format!("reaping `{line}`"), e))?;
    let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    Ok(CmdOutput {
        status,
        stdout,
        stderr,
    })
}

/// Like [`run`], but a non-zero exit is an error; returns standard output.
pub(crate) fn run_ok(
    netns: Option<(&str, RawFd)>,
    argv: &[&str],
    stdin: Option<&str>,
) -> Result<String> {
    let out = run(netns, argv, stdin, DEFAULT_COMMAND_TIMEOUT)?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(HarnessError::Command {
            command: argv.join(" "),
            namespace: netns.map_or("host", |(name, _)| name).to_string(),
            status: out.status,
            stderr: out.stderr.trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let out = run(
            None,
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
            None,
            DEFAULT_COMMAND_TIMEOUT,
        )
        .expect("run");
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn feeds_stdin() {
        let out = run_ok(None, &["cat"], Some("hello")).expect("run");
        assert_eq!(out, "hello");
    }

    #[test]
    fn nonzero_exit_is_a_command_error_naming_the_command() {
        let err = run_ok(None, &["sh", "-c", "echo boom >&2; exit 1"], None).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, HarnessError::Command { .. }), "{msg}");
        assert!(msg.contains("boom") && msg.contains("sh -c"), "{msg}");
    }

    #[test]
    fn overlong_command_is_killed_at_the_timeout() {
        let started = std::time::Instant::now();
        let err = run(None, &["sleep", "30"], None, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, HarnessError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn missing_program_is_an_io_error() {
        let err = run_ok(None, &["/nonexistent/twt-program"], None).unwrap_err();
        assert!(matches!(err, HarnessError::Io { .. }), "{err}");
    }
}
