//! The harness's error type.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Everything the harness can fail with. Messages name the namespace, command or request
/// involved so that a failing test says what broke without a debugger. `Debug` prints the
/// same message as `Display`, so `.expect()` in a test shows it readably (multi-line process
/// output included).
#[derive(thiserror::Error)]
pub enum HarnessError {
    /// An I/O operation failed; `context` says which one.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A helper command (`ip`, `tc`, `nft`, `ping`, …) exited unsuccessfully.
    #[error("`{command}` in {namespace} failed ({status}): {stderr}")]
    Command {
        /// The command line, for the message.
        command: String,
        /// The namespace it ran in (`host` for the initial one).
        namespace: String,
        /// How it ended.
        status: ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },

    /// Something did not happen within its time limit.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The limit.
        after: Duration,
    },

    /// A spawned process ended while the harness was still waiting for something from it.
    #[error("{name} exited ({status}) while waiting for {what}; last output:\n{tail}")]
    ProcessExited {
        /// The process's label.
        name: String,
        /// Its exit status, rendered.
        status: String,
        /// What was awaited.
        what: String,
        /// The last lines it printed.
        tail: String,
    },

    /// The `twin` binary could not be found.
    #[error("twin binary not found (looked at: {}); build it with `cargo build --release` or set TWIN_BIN", .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    BinaryNotFound {
        /// The paths that were tried.
        searched: Vec<PathBuf>,
    },

    /// The guest answered something that does not fit the protocol.
    #[error("guest protocol: request `{request}` got unexpected reply `{reply}`")]
    Protocol {
        /// The request line sent.
        request: String,
        /// The reply line received.
        reply: String,
    },

    /// The guest answered with an `ERR …` line.
    #[error("guest refused `{request}`: {reply}")]
    Guest {
        /// The request line sent.
        request: String,
        /// The reply line received.
        reply: String,
    },

    /// A caller passed something the harness cannot use (e.g. a key with a space in it).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl std::fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl HarnessError {
    /// Wraps an I/O error with a description of what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// The harness's result type.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;
