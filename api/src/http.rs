//! The control API's request and error types: what `twin`'s HTTP/1.1 + JSON control
//! socket (`/v1/...`, described in `twin/openapi.yaml`) takes and answers besides the
//! status structures and events.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::status::{Compression, LossPolicy};

/// The version prefix of every path.
pub const API_PREFIX: &str = "/v1";

/// Why a request failed, as a stable machine-readable code (the message is for humans).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed (bad JSON, a bad field, a bad query).
    BadRequest,
    /// No such path.
    NotFound,
    /// The path exists, not with this method.
    MethodNotAllowed,
    /// The body is longer than the server takes.
    PayloadTooLarge,
    /// The process is not in a state for this (a protected VM cannot be paused, a backup
    /// has no VM yet, a VM is protected already).
    Conflict,
    /// This process does not do this at all (failover asked of a primary).
    NotSupported,
    /// A long operation (a snapshot) is under way; try again when it ends.
    Busy,
    /// The operation was tried and failed (a snapshot that could not be written).
    Failed,
    /// The VM process did not take the request in time.
    Timeout,
    /// The process is shutting down, or the connection cap is reached.
    Unavailable,
    /// The peer may not use this socket.
    Forbidden,
}

impl ErrorCode {
    /// The HTTP status that goes with the code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Conflict | ErrorCode::Busy => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::Failed => 500,
            ErrorCode::NotSupported => 501,
            ErrorCode::Unavailable => 503,
            ErrorCode::Timeout => 504,
        }
    }
}

/// An error answer: `{"error": {"code": "...", "message": "..."}}` on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

/// The body of an error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

/// `PUT /v1/vm/snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// Directory to create, absolute (the client resolves a relative one: the VM process
    /// runs in a directory of its own).
    pub dir: PathBuf,
    #[serde(default)]
    pub incremental: bool,
    #[serde(default)]
    pub stop: bool,
}

/// `PUT /v1/protect`: put the running VM under protection (a live initial sync to the
/// backup, then epochs), as `xl remus` does to a running domain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProtectRequest {
    /// The backup's replication address, `HOST:PORT`.
    pub backup: String,
    /// Pre-shared key file of the link (absolute; read by the VM process).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Run the link unauthenticated (needs no `key_file`).
    #[serde(default)]
    pub no_auth: bool,
    #[serde(default)]
    pub encrypt: bool,
    /// The longest an epoch lasts, ms.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: f64,
    /// Eager output commit gap, ms; `null`: checkpoint on the interval only.
    #[serde(default = "default_eager_gap_ms")]
    pub eager_gap_ms: Option<f64>,
    /// Pre-copy each epoch's pages while the guest runs, so the pause copies only what is
    /// written in between; `false`: every page is copied inside the pause.
    #[serde(default = "default_precopy")]
    pub precopy: bool,
    #[serde(default = "default_loss")]
    pub on_backup_loss: LossPolicy,
    /// Silence from the backup longer than this means it is lost, ms.
    #[serde(default = "default_backup_timeout_ms")]
    pub backup_timeout_ms: f64,
    /// etcd arbiter, `etcd://HOST:PORT[,...]`.
    #[serde(default)]
    pub arbiter: Option<String>,
    /// How checkpoint pages are encoded.
    #[serde(default)]
    pub compress: Compression,
    /// The delta cache (what the primary last sent of each page), bytes.
    #[serde(default = "default_compress_cache")]
    pub compress_cache: u64,
}

/// Default size of the delta cache: 64 MiB (16,384 pages).
pub const DEFAULT_COMPRESS_CACHE: u64 = 64 << 20;

fn default_compress_cache() -> u64 {
    DEFAULT_COMPRESS_CACHE
}

fn default_interval_ms() -> f64 {
    25.0
}
fn default_eager_gap_ms() -> Option<f64> {
    Some(2.0)
}
fn default_precopy() -> bool {
    true
}
fn default_loss() -> LossPolicy {
    LossPolicy::Release
}
fn default_backup_timeout_ms() -> f64 {
    500.0
}

/// The query of `GET /v1/events`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsQuery {
    #[serde(default)]
    pub since: u64,
    #[serde(default)]
    pub epochs: bool,
    #[serde(default)]
    pub follow: bool,
}

/// The response header of `GET /v1/events` with the sequence number the next event gets.
pub const NEXT_SEQ_HEADER: &str = "twin-next-seq";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_code_and_message() {
        let e = ErrorBody {
            error: ApiError::new(ErrorCode::Busy, "taking a snapshot"),
        };
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"error": {"code": "busy", "message": "taking a snapshot"}})
        );
        assert_eq!(ErrorCode::Busy.http_status(), 409);
    }

    #[test]
    fn protect_defaults_mirror_the_flags() {
        let p: ProtectRequest = serde_json::from_str(r#"{"backup": "10.0.0.9:7000"}"#).unwrap();
        assert_eq!(p.interval_ms, 25.0);
        assert_eq!(p.eager_gap_ms, Some(2.0));
        assert_eq!(p.on_backup_loss, LossPolicy::Release);
        assert_eq!(p.backup_timeout_ms, 500.0);
        assert!(!p.no_auth && p.key_file.is_none());
        assert_eq!(p.compress, Compression::Delta);
        assert_eq!(p.compress_cache, 64 << 20);
    }
}
