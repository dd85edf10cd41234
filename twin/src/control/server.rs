//! The control API's HTTP server: a single-threaded tokio runtime on the `control` thread,
//! hyper's HTTP/1.1 connections with axum's routing, and the bounds of the module docs.

use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, put};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use twin_api::{
    ApiError, ErrorBody, ErrorCode, EventLog, EventsQuery, ProtectRequest, Request, Response,
    SnapshotRequest,
};

use super::{Incoming, Limits, Reply, ANSWER_TIMEOUT};
use crate::metrics::Metrics;

/// Back-off after a failed accept: doubling from the first to the last.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often a followed event stream with nothing to send looks whether to stop.
const STREAM_CHECK: Duration = Duration::from_millis(250);
/// How long a connection may take to finish its answer when the server stops.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(200);

/// The OpenAPI description of this API, served at `/v1/openapi.yaml`.
pub const OPENAPI: &str = include_str!("../../openapi.yaml");

pub(crate) struct Config {
    pub listener: StdUnixListener,
    pub tx: Sender<Incoming>,
    pub events: Arc<EventLog>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub path: PathBuf,
    pub stop: watch::Receiver<bool>,
}

/// A long operation under way in the main loop.
struct Busy {
    what: &'static str,
    since: Instant,
}

/// What every handler shares.
struct Shared {
    tx: Mutex<Sender<Incoming>>,
    events: Arc<EventLog>,
    metrics: Arc<Metrics>,
    limits: Limits,
    busy: Mutex<Option<Busy>>,
    /// Set when the server stops: followed event streams end.
    stopping: Arc<AtomicBool>,
}

type AppState = Arc<Shared>;

/// What [`super::Control`] keeps of a running server: a way to add listeners to it.
pub(crate) struct Handle {
    rt: tokio::runtime::Handle,
    shared: AppState,
    stop: watch::Receiver<bool>,
}

/// Starts the server thread.
pub(crate) fn spawn(cfg: Config) -> std::io::Result<(JoinHandle<()>, Handle)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let shared = Arc::new(Shared {
        tx: Mutex::new(cfg.tx.clone()),
        events: cfg.events.clone(),
        metrics: cfg.metrics.clone(),
        limits: cfg.limits,
        busy: Mutex::new(None),
        stopping: Arc::new(AtomicBool::new(false)),
    });
    let handle = Handle {
        rt: rt.handle().clone(),
        shared: shared.clone(),
        stop: cfg.stop.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            rt.block_on(run(cfg, shared));
            rt.shutdown_timeout(Duration::from_secs(1));
        })?;
    Ok((thread, handle))
}

/// Connections the metrics listener serves at once.
const METRICS_CONNECTIONS: usize = 8;

impl Handle {
    /// Serves `GET /metrics` over TCP on `listener` until the server stops.
    pub(crate) fn serve_metrics(&self, listener: std::net::TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let _guard = self.rt.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/v1/metrics", get(metrics))
            .fallback(not_found)
            .with_state(self.shared.clone());
        let limits = self.shared.limits;
        let mut stop = self.stop.clone();
        self.rt.spawn(async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
            let mut backoff = Backoff::default();
            loop {
                let accepted = tokio::select! {
                    _ = stop.changed() => return,
                    a = listener.accept() => a,
                };
                match accepted {
                    Ok((stream, _)) => {
                        backoff.succeeded();
                        // Beyond the cap the scrape is closed unanswered: a scraper retries.
                        let Ok(permit) = permits.clone().try_acquire_owned() else {
                            continue;
                        };
                        let (app, stop) = (app.clone(), stop.clone());
                        tokio::spawn(async move {
                            serve_connection(stream, app, limits, stop).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        let (pause, first) = backoff.failed();
                        if first {
                            tracing::warn!(error = %e, "metrics listener: accept failed; backing off");
                        }
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        });
        Ok(())
    }
}

/// Accept failures in a row: how long to sleep next and whether to log.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    failures: u64,
    delay: Duration,
}

impl Backoff {
    /// A failed accept: the pause before the next one, and whether this failure is the
    /// first of its run (the one to log).
    pub(crate) fn failed(&mut self) -> (Duration, bool) {
        self.failures += 1;
        self.delay = if self.failures == 1 {
            BACKOFF_MIN
        } else {
            (self.delay * 2).min(BACKOFF_MAX)
        };
        (self.delay, self.failures == 1)
    }

    /// A successful accept: the number of failures that preceded it (0: nothing to say).
    pub(crate) fn succeeded(&mut self) -> u64 {
        std::mem::take(self).failures
    }
}

async fn run(cfg: Config, shared: AppState) {
    let Config {
        listener,
        limits,
        path,
        mut stop,
        ..
    } = cfg;
    let listener = match UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "control socket: cannot register the listener");
            return;
        }
    };
    let stopping = shared.stopping.clone();
    let app = router(shared);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut conns = tokio::task::JoinSet::new();
    let mut backoff = Backoff::default();
    let mut at_cap = false;
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let failed = backoff.succeeded();
                if failed > 0 {
                    tracing::info!(path = %path.display(), failed, "control socket: accepting again");
                }
                if let Err(why) = check_peer(&stream) {
                    tracing::warn!(path = %path.display(), "control socket: refused a connection: {why}");
                    refuse(&stream, ErrorCode::Forbidden, &why);
                    continue;
                }
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    if !at_cap {
                        tracing::warn!(path = %path.display(), max = limits.max_connections, "control socket: too many connections, refusing more (logged once until below the cap)");
                        at_cap = true;
                    }
                    refuse(
                        &stream,
                        ErrorCode::Unavailable,
                        &format!(
                            "too many control connections ({} open); try again later",
                            limits.max_connections
                        ),
                    );
                    continue;
                };
                at_cap = false;
                let (app, stop) = (app.clone(), stop.clone());
                conns.spawn(async move {
                    serve_connection(stream, app, limits, stop).await;
                    drop(permit);
                });
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection stays queued and the
                // listener readable; retrying at once would spin.
                let (pause, first) = backoff.failed();
                if first {
                    tracing::warn!(path = %path.display(), error = %e, "control socket: accept failed; backing off up to 1 s between tries (logged once until it works again)");
                }
                tokio::select! {
                    _ = stop.changed() => break,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
    stopping.store(true, Ordering::Release);
    // Every connection sees the stop too; give them their grace, then drop what is left.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE * 2, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}

/// Serves one connection: HTTP/1.1 with keep-alive, its head within `limits.idle`.
async fn serve_connection<S>(
    stream: S,
    app: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await;
        }
    }
}

/// Root or our own uid only: the socket's mode already says so, this holds even if the
/// mode is widened later (or the socket is reached through a descriptor passed on).
fn check_peer(stream: &UnixStream) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    let me = unsafe { libc::geteuid() };
    if cred.uid() == 0 || cred.uid() == me {
        Ok(())
    } else {
        Err(format!(
            "uid {} (pid {}) may not use this control socket (only root and uid {me})",
            cred.uid(),
            cred.pid().unwrap_or(0)
        ))
    }
}

/// The JSON body of an error.
fn error_json(e: &ApiError) -> String {
    serde_json::to_string(&ErrorBody { error: e.clone() }).expect("errors serialize")
}

/// Answers a connection we do not serve with a complete HTTP error and closes it: one
/// non-blocking write into a fresh socket's empty buffer, so it never waits on the peer.
fn refuse(stream: &UnixStream, code: ErrorCode, why: &str) {
    let body = error_json(&ApiError::new(code, why));
    let status = StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    let msg = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let _ = stream.try_write(msg.as_bytes());
}

/// An error as an HTTP answer.
struct Failure(ApiError);

impl IntoResponse for Failure {
    fn into_response(self) -> HttpResponse {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            error_json(&self.0),
        )
            .into_response()
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure(e)
    }
}

type Answer = Result<Json<serde_json::Value>, Failure>;

fn router(shared: AppState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/vm/pause", put(pause))
        .route("/v1/vm/resume", put(resume))
        .route("/v1/vm/snapshot", put(snapshot))
        .route("/v1/protect", put(protect))
        .route("/v1/failover", put(failover))
        .route("/v1/events", get(events))
        .route("/v1/metrics", get(metrics))
        .route("/v1/openapi.yaml", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
}

async fn not_found(uri: axum::http::Uri) -> Failure {
    let hint = if uri.path().starts_with("/v1/") {
        ""
    } else {
        " (every path starts with /v1/)"
    };
    Failure(ApiError::new(
        ErrorCode::NotFound,
        format!("no such path {}{hint}", uri.path()),
    ))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Failure {
    Failure(ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{} does not take {method}", uri.path()),
    ))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI)
}

/// The JSON body of a request, within the body bound: a `Content-Length` beyond it is
/// refused before a byte of the body is read.
async fn json_body<T: DeserializeOwned>(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let limit = shared.limits.max_body;
    let too_long = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("request body longer than {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_long());
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let source = e.into_inner();
        if source
            .downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            too_long()
        } else {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("reading the request body: {source}"),
            )
        }
    })?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("malformed request: {e}")))
}

/// Asks the main loop; see the module docs for the deadlines and `busy`.
async fn ask(shared: &AppState, req: Request) -> Result<serde_json::Value, ApiError> {
    if let Some(b) = shared
        .busy
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        return Err(ApiError::new(
            ErrorCode::Busy,
            format!(
                "the VM process is {} ({:.1} s so far); try again when it ends",
                b.what,
                b.since.elapsed().as_secs_f64()
            ),
        ));
    }
    let what = req.what();
    let (reply, mut rx) = Reply::channel();
    let sent = shared
        .tx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((req, reply));
    let gone = || ApiError::new(ErrorCode::Unavailable, "the VM process is shutting down");
    if sent.is_err() {
        return Err(gone());
    }
    let first = match tokio::time::timeout(ANSWER_TIMEOUT, rx.recv()).await {
        Err(_) => {
            return Err(ApiError::new(
                ErrorCode::Timeout,
                format!(
                    "the VM process did not take the request ({what}) within {} s",
                    ANSWER_TIMEOUT.as_secs()
                ),
            ))
        }
        Ok(None) => return Err(gone()),
        Ok(Some(r)) => r,
    };
    match first {
        Response::Ok(v) => Ok(v),
        Response::Error(e) => Err(e),
        Response::Accepted(_) => {
            // A long operation has started: its outcome comes when it ends. A task of its
            // own waits for it, so that `busy` holds until then even if this client goes.
            *shared.busy.lock().unwrap_or_else(|e| e.into_inner()) = Some(Busy {
                what,
                since: Instant::now(),
            });
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            let s = shared.clone();
            tokio::spawn(async move {
                let outcome = loop {
                    match rx.recv().await {
                        Some(Response::Accepted(_)) => continue,
                        other => break other,
                    }
                };
                *s.busy.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let _ = done_tx.send(outcome);
            });
            match done_rx.await {
                Ok(Some(Response::Ok(v))) => Ok(v),
                Ok(Some(Response::Error(e))) => Err(e),
                _ => Err(gone()),
            }
        }
    }
}

async fn status(State(s): State<AppState>) -> Answer {
    Ok(Json(ask(&s, Request::Status).await?))
}

async fn pause(State(s): State<AppState>) -> Answer {
    Ok(Json(ask(&s, Request::Pause).await?))
}

async fn resume(State(s): State<AppState>) -> Answer {
    Ok(Json(ask(&s, Request::Resume).await?))
}

async fn failover(State(s): State<AppState>) -> Answer {
    Ok(Json(ask(&s, Request::Failover).await?))
}

async fn snapshot(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Answer {
    let req: SnapshotRequest = json_body(&s, &headers, body).await?;
    if !req.dir.is_absolute() {
        return Err(Failure(ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "snapshot directory {} is relative; give an absolute path (the VM process \
                 does not run in the client's directory)",
                req.dir.display()
            ),
        )));
    }
    Ok(Json(ask(&s, Request::Snapshot(req)).await?))
}

async fn protect(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Answer {
    let req: ProtectRequest = json_body(&s, &headers, body).await?;
    if let Some(k) = req.key_file.as_ref().filter(|k| !k.is_absolute()) {
        return Err(Failure(ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "key file {} is relative; give an absolute path",
                k.display()
            ),
        )));
    }
    if req.key_file.is_none() && !req.no_auth {
        return Err(Failure(ApiError::new(
            ErrorCode::BadRequest,
            "give key_file (the replication link's key) or no_auth: true",
        )));
    }
    Ok(Json(ask(&s, Request::Protect(req)).await?))
}

async fn metrics(State(s): State<AppState>) -> HttpResponse {
    // The status part is what the main loop answers; the rest the server keeps itself.
    let status = ask(&s, Request::Status).await.ok();
    let text = s.metrics.render(status.as_ref());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn events(
    State(s): State<AppState>,
    q: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<HttpResponse, Failure> {
    let Query(q) = q.map_err(|e| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("bad events query: {}", e.body_text()),
        )
    })?;
    let next = s.events.next_seq();
    let mut sub = s.events.subscribe(q.since, q.epochs);
    let body = if q.follow {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let stopping = s.stopping.clone();
        std::thread::Builder::new()
            .name("control-events".into())
            .spawn(move || loop {
                if stopping.load(Ordering::Acquire) || tx.is_closed() {
                    return;
                }
                let batch = sub.next_batch(STREAM_CHECK);
                if !batch.is_empty() && tx.blocking_send(encode(&batch)).is_err() {
                    return;
                }
            })
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::Unavailable,
                    format!("cannot start an event stream: {e}"),
                )
            })?;
        Body::from_stream(futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx).map(|b| b.map(Ok::<_, std::io::Error>))
        }))
    } else {
        let mut all = Vec::new();
        loop {
            let batch = sub.next_batch(Duration::ZERO);
            if batch.is_empty() {
                break;
            }
            all.extend_from_slice(&encode(&batch));
        }
        Body::from(all)
    };
    let mut resp = ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response();
    resp.headers_mut()
        .insert(twin_api::http::NEXT_SEQ_HEADER, HeaderValue::from(next));
    Ok(resp)
}

/// Events as JSON lines.
fn encode(batch: &[twin_api::Event]) -> Bytes {
    let mut out = Vec::new();
    for e in batch {
        serde_json::to_writer(&mut out, e).expect("events serialize");
        out.push(b'\n');
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_back_off_and_are_logged_once() {
        let mut b = Backoff::default();
        let runs: Vec<(Duration, bool)> = (0..10).map(|_| b.failed()).collect();
        assert_eq!(runs[0], (BACKOFF_MIN, true));
        assert!(
            runs[1..].iter().all(|&(_, log)| !log),
            "logged once: {runs:?}"
        );
        assert!(runs.windows(2).all(|w| w[1].0 >= w[0].0), "{runs:?}");
        assert_eq!(runs[9].0, BACKOFF_MAX);
        let total: Duration = runs.iter().map(|r| r.0).sum();
        assert!(
            total > Duration::from_secs(3),
            "ten failures spread over {total:?}"
        );
        assert_eq!(b.succeeded(), 10);
        assert_eq!(b.succeeded(), 0);
        assert_eq!(b.failed(), (BACKOFF_MIN, true), "a new run logs again");
    }
}
