//! What programs read from a Twin process, instead of its log lines: typed lifecycle
//! [`events`] (a log with a sequence number, streamed on the control socket), typed
//! [`status`] of each kind of process, and the control socket's [`Request`] / [`Response`].
//!
//! The log lines stay for humans; they may change wording at any time. These types are the
//! interface: tests, `twin bench`, `twin demo` and monitoring scripts consume them.

pub mod events;
pub mod http;
pub mod status;

pub use events::{Decision, Event, EventKind, EventLog, FailoverReport, Role, Subscription};
pub use http::{
    ApiError, ErrorBody, ErrorCode, EventsQuery, ProtectRequest, SnapshotRequest,
    DEFAULT_COMPRESS_CACHE,
};
pub use status::{
    BackupState, BackupStatus, Compression, CompressionStatus, LossPolicy, Mode, PrimaryStatus,
    RestoreStatus, VmStatus,
};

use serde::{Deserialize, Serialize};

/// What a control-socket client asks of the VM process's main loop (the HTTP server maps
/// each `/v1/...` route to one).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Request {
    Status,
    Pause,
    Resume,
    Snapshot(SnapshotRequest),
    /// Put the running VM under protection.
    Protect(ProtectRequest),
    Failover,
    /// Events: served by the control server itself from the process's [`EventLog`]
    /// (`GET /v1/events`); never sent to the main loop.
    Events(EventsQuery),
}

impl Request {
    /// A short name for messages (`taking a snapshot`).
    pub fn what(&self) -> &'static str {
        match self {
            Request::Status => "reading the status",
            Request::Pause => "pausing the VM",
            Request::Resume => "resuming the VM",
            Request::Snapshot(_) => "taking a snapshot",
            Request::Protect(_) => "starting protection",
            Request::Failover => "failing over",
            Request::Events(_) => "streaming events",
        }
    }
}

/// An answer of the main loop: a JSON value on success, an error with a code. A long
/// operation answers [`Response::Accepted`] first (it has started; no deadline applies to
/// its outcome any more), then its outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    Ok(serde_json::Value),
    Accepted(serde_json::Value),
    Error(ApiError),
}

impl Response {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Error(ApiError::new(code, message))
    }
}
