//! What programs read from a Twin process, instead of its log lines: typed lifecycle
//! [`events`] (a log with a sequence number, streamed on the control socket), typed
//! [`status`] of each kind of process, and the control socket's [`Request`] / [`Response`].
//!
//! The log lines stay for humans; they may change wording at any time. These types are the
//! interface: tests, `twin bench`, `twin demo` and monitoring scripts consume them.

pub mod events;
pub mod status;

pub use events::{Decision, Event, EventKind, EventLog, FailoverReport, Role, Subscription};
pub use status::{BackupState, BackupStatus, LossPolicy, Mode, PrimaryStatus, VmStatus};

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Requests a control-socket client can make (one JSON object per line).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Request {
    Status,
    Snapshot {
        dir: PathBuf,
        incremental: bool,
        stop: bool,
    },
    Resume,
    Failover,
    /// Events: the server answers `Ok({"next_seq": N})`, then sends every event still held
    /// with `seq >= since`, one JSON [`Event`] per line; with `follow`, each new one as it
    /// happens until the client closes, else it closes. Per-epoch events only with
    /// `epochs`.
    Events {
        since: u64,
        epochs: bool,
        follow: bool,
    },
}

/// A response: a JSON value on success, a message on failure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    Ok(serde_json::Value),
    Error(String),
}
