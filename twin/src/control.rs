//! The control socket: one JSON request per line, one JSON response per line, over a Unix
//! stream socket. `twin status`, `twin snapshot` and `twin failover` are its clients; the
//! process running a VM serves it from its main loop.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Requests a client can make.
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
}

/// A response: a JSON value on success, a message on failure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    Ok(serde_json::Value),
    Error(String),
}

/// A request from a client and where to send its answer.
pub type Incoming = (Request, Sender<Response>);

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the control socket {path} (is the VM process running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path} did not answer")]
    Exchange {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path} answered something that is not a response")]
    BadResponse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Listens on `path` (replacing a stale socket) and forwards requests to the returned
/// receiver. The main loop answers them; a client whose request is not answered within
/// 30 s gets an error.
pub fn serve(path: &Path) -> Result<Receiver<Incoming>, ControlError> {
    let bind_err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    let (tx, rx) = channel();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let tx = tx.clone();
                std::thread::spawn(move || handle(conn, tx));
            }
        })
        .map_err(bind_err)?;
    Ok(rx)
}

fn handle(conn: UnixStream, tx: Sender<Incoming>) {
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut lines = BufReader::new(conn).lines();
    while let Some(Ok(line)) = lines.next() {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let (rtx, rrx) = channel();
                if tx.send((req, rtx)).is_err() {
                    return;
                }
                rrx.recv_timeout(Duration::from_secs(30))
                    .unwrap_or_else(|_| Response::Error("the VM process did not answer".into()))
            }
            Err(e) => Response::Error(format!("malformed request: {e}")),
        };
        let mut out = serde_json::to_string(&response).expect("responses serialize");
        out.push('\n');
        if writer.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

/// Sends one request and waits for its response.
pub fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let exchange = |source| ControlError::Exchange {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(exchange)?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    conn.write_all(line.as_bytes()).map_err(exchange)?;
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .map_err(exchange)?;
    serde_json::from_str(&answer).map_err(|source| ControlError::BadResponse {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_malformed_input() {
        let path = std::env::temp_dir().join(format!("twin-ctl-test-{}.sock", std::process::id()));
        let rx = serve(&path).unwrap();
        std::thread::spawn(move || {
            while let Ok((req, reply)) = rx.recv() {
                let _ = reply.send(match req {
                    Request::Status => Response::Ok(serde_json::json!({"role": "test"})),
                    other => Response::Error(format!("unsupported {other:?}")),
                });
            }
        });
        match request(&path, &Request::Status).unwrap() {
            Response::Ok(v) => assert_eq!(v["role"], "test"),
            Response::Error(e) => panic!("{e}"),
        }
        assert!(matches!(
            request(&path, &Request::Failover).unwrap(),
            Response::Error(_)
        ));
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"{nonsense\n").unwrap();
        let mut a = String::new();
        BufReader::new(c).read_line(&mut a).unwrap();
        assert!(a.contains("malformed request"), "{a}");
        let _ = std::fs::remove_file(&path);
        assert!(matches!(
            request(&path, &Request::Status),
            Err(ControlError::Connect { .. })
        ));
    }
}
