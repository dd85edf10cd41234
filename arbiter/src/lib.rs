//! The arbiter: who owns a protected VM, decided in etcd.
//!
//! One record per VM, `/twin/vm/<vm id>/owner`, holding the owner (a process's incarnation
//! id and a label for humans) and a generation that only grows (the fencing token). It is
//! consulted only when a decision is needed — a backup about to take over, a primary about
//! to release output no backup acknowledged — never on the epoch path, so protection costs
//! nothing while both sides see each other. A decision is a compare-and-swap
//! ([`Arbiter::claim`]): "if the record is still the one I last saw, it is mine at the next
//! generation". Two contenders that saw the same record race on one etcd transaction and
//! exactly one wins; the loser fences (a primary drops its unacknowledged output and stops,
//! a backup detaches). A primary also [`Arbiter::watch`]es its record, to learn at once
//! that it lost.
//!
//! etcd is reached through its v3 JSON gateway (`/v3/kv/range`, `/v3/kv/txn`,
//! `/v3/watch`) with a blocking HTTP client (`ureq`): no async runtime beside the data
//! path's threads, and no protobuf compiler at build time. Keys and values are base64 in
//! that API; revisions are decimal strings.

use std::io::Read;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// How long one request to etcd may take: a decision waits for it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(1000);

/// Errors talking to the arbiter.
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    #[error("--arbiter {0:?} is not etcd://HOST:PORT[,HOST:PORT…]")]
    BadUrl(String),
    #[error("no etcd endpoint answered ({tried}): {last}")]
    Unreachable { tried: String, last: String },
    #[error("etcd answered something unexpected: {0}")]
    Protocol(String),
    #[error("the ownership record of VM {vm} is not Twin's: {what}")]
    BadRecord { vm: String, what: String },
}

/// Who owns a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// A process's incarnation id: unique per process start.
    pub id: String,
    /// For humans: the role and where it runs.
    pub label: String,
}

/// The ownership record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub owner: Owner,
    /// Grows by one at every claim: the fencing token.
    pub generation: u64,
}

/// The record as read, with the etcd revision a claim must compare against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub record: Option<Record>,
    /// `mod_revision` of the key (0: no such key).
    pub revision: i64,
}

impl Seen {
    pub fn generation(&self) -> u64 {
        self.record.as_ref().map_or(0, |r| r.generation)
    }

    pub fn owned_by(&self, id: &str) -> bool {
        self.record.as_ref().is_some_and(|r| r.owner.id == id)
    }

    /// The owner's label, for messages ("nobody" when there is no record).
    pub fn owner_label(&self) -> &str {
        self.record
            .as_ref()
            .map_or("nobody", |r| r.owner.label.as_str())
    }

    /// Why a replica that sees this record must not run the VM.
    pub fn given_away(&self) -> String {
        format!(
            "the arbiter gives the VM to {} (generation {})",
            self.owner_label(),
            self.generation()
        )
    }
}

/// What a claim came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The record is ours now, at this generation.
    Won(Seen),
    /// Someone changed the record since we saw it: this is the record now.
    Lost(Seen),
}

/// A client for one etcd cluster.
#[derive(Clone)]
pub struct Arbiter {
    endpoints: Vec<String>,
    agent: ureq::Agent,
    /// For watches: no overall timeout (the stream lasts), only the connection's.
    watch_agent: ureq::Agent,
}

impl std::fmt::Debug for Arbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Arbiter({})", self.endpoints.join(","))
    }
}

fn key(vm: &str) -> String {
    B64.encode(format!("/twin/vm/{vm}/owner"))
}

fn revision(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

impl Arbiter {
    /// A client for `etcd://HOST:PORT[,HOST:PORT…]`.
    pub fn new(url: &str) -> Result<Self, ArbiterError> {
        let bad = || ArbiterError::BadUrl(url.to_string());
        let rest = url.strip_prefix("etcd://").ok_or_else(bad)?;
        let endpoints: Vec<String> = rest
            .split(',')
            .map(|e| e.trim().trim_end_matches('/'))
            .filter(|e| !e.is_empty())
            .map(|e| format!("http://{e}"))
            .collect();
        if endpoints.is_empty() || endpoints.iter().any(|e| !e[7..].contains(':')) {
            return Err(bad());
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        let watch_agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Arbiter {
            endpoints,
            agent,
            watch_agent,
        })
    }

    /// The endpoints, for messages.
    pub fn endpoints(&self) -> String {
        self.endpoints.join(",")
    }

    /// POSTs `body` to `path` on the first endpoint that answers.
    fn call(&self, path: &str, body: &Value) -> Result<Value, ArbiterError> {
        let mut last = String::from("no endpoint");
        for ep in &self.endpoints {
            match self.agent.post(&format!("{ep}{path}")).send_json(body) {
                Ok(mut resp) if resp.status().is_success() => {
                    return resp
                        .body_mut()
                        .read_json::<Value>()
                        .map_err(|e| ArbiterError::Protocol(e.to_string()));
                }
                Ok(mut resp) => {
                    let status = resp.status();
                    let text = resp.body_mut().read_to_string().unwrap_or_default();
                    last = format!("{ep}: HTTP {status}: {}", text.trim());
                }
                Err(e) => last = format!("{ep}: {e}"),
            }
        }
        Err(ArbiterError::Unreachable {
            tried: self.endpoints(),
            last,
        })
    }

    fn parse_kv(vm: &str, kv: Option<&Value>) -> Result<Seen, ArbiterError> {
        let Some(kv) = kv else {
            return Ok(Seen {
                record: None,
                revision: 0,
            });
        };
        let bad = |what: String| ArbiterError::BadRecord {
            vm: vm.to_string(),
            what,
        };
        let rev = revision(&kv["mod_revision"]).ok_or_else(|| bad("no mod_revision".into()))?;
        let raw = B64
            .decode(kv["value"].as_str().unwrap_or_default())
            .map_err(|e| bad(format!("value is not base64: {e}")))?;
        let record: Record =
            serde_json::from_slice(&raw).map_err(|e| bad(format!("value is not a record: {e}")))?;
        Ok(Seen {
            record: Some(record),
            revision: rev,
        })
    }

    /// The VM's record as it stands.
    pub fn get(&self, vm: &str) -> Result<Seen, ArbiterError> {
        let r = self.call("/v3/kv/range", &json!({ "key": key(vm) }))?;
        Self::parse_kv(vm, r["kvs"].as_array().and_then(|a| a.first()))
    }

    /// If the record is still at `seen.revision` (0: absent), makes it `owner`'s at
    /// `seen.generation() + 1`, atomically.
    pub fn claim(&self, vm: &str, seen: &Seen, owner: &Owner) -> Result<Claim, ArbiterError> {
        let next = Record {
            owner: owner.clone(),
            generation: seen.generation() + 1,
        };
        let value = B64.encode(serde_json::to_vec(&next).expect("records serialize"));
        let compare = if seen.revision == 0 {
            json!({ "key": key(vm), "target": "CREATE", "result": "EQUAL", "create_revision": "0" })
        } else {
            json!({ "key": key(vm), "target": "MOD", "result": "EQUAL", "mod_revision": seen.revision.to_string() })
        };
        let r = self.call(
            "/v3/kv/txn",
            &json!({
                "compare": [compare],
                "success": [{ "request_put": { "key": key(vm), "value": value } }],
                "failure": [{ "request_range": { "key": key(vm) } }],
            }),
        )?;
        if r["succeeded"].as_bool().unwrap_or(false) {
            let rev = revision(&r["header"]["revision"])
                .ok_or_else(|| ArbiterError::Protocol(format!("txn without a revision: {r}")))?;
            Ok(Claim::Won(Seen {
                record: Some(next),
                revision: rev,
            }))
        } else {
            let kv = r["responses"]
                .as_array()
                .and_then(|a| a.first())
                .and_then(|x| x["response_range"]["kvs"].as_array())
                .and_then(|a| a.first());
            let now = Self::parse_kv(vm, kv)?;
            // The very record this claim writes, by this incarnation: an earlier attempt of
            // the same claim landed but its answer was lost (a timeout on the way back), so
            // the retry finds the revision moved — by itself. That is a win, not a loss
            // (else a backup whose link dropped etcd's reply would detach from a VM the
            // record gives to it, and nobody would run it).
            if now.record.as_ref() == Some(&next) {
                return Ok(Claim::Won(now));
            }
            Ok(Claim::Lost(now))
        }
    }

    /// Follows the VM's record from `after_revision` on, calling `changed` with each new
    /// version (or `None` when the key was deleted) until it returns `false`, the stream
    /// breaks (an `Err`), or `stop()` says so (checked between events and at least every
    /// few seconds through etcd's progress notifications).
    pub fn watch(
        &self,
        vm: &str,
        after_revision: i64,
        stop: &dyn Fn() -> bool,
        changed: &mut dyn FnMut(Seen) -> bool,
    ) -> Result<(), ArbiterError> {
        let body = json!({ "create_request": {
            "key": key(vm),
            "start_revision": (after_revision + 1).to_string(),
            "progress_notify": true,
        }});
        let mut last = String::from("no endpoint");
        for ep in &self.endpoints {
            let resp = match self
                .watch_agent
                .post(&format!("{ep}/v3/watch"))
                .send_json(&body)
            {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => {
                    last = format!("{ep}: HTTP {}", r.status());
                    continue;
                }
                Err(e) => {
                    last = format!("{ep}: {e}");
                    continue;
                }
            };
            let reader = resp.into_body().into_reader();
            let stream =
                serde_json::Deserializer::from_reader(reader.take(u64::MAX)).into_iter::<Value>();
            for msg in stream {
                if stop() {
                    return Ok(());
                }
                let msg = msg.map_err(|e| ArbiterError::Protocol(format!("watch stream: {e}")))?;
                let events = msg["result"]["events"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for ev in events {
                    let seen = if ev["type"].as_str() == Some("DELETE") {
                        Seen {
                            record: None,
                            revision: revision(&ev["kv"]["mod_revision"]).unwrap_or(0),
                        }
                    } else {
                        Self::parse_kv(vm, Some(&ev["kv"]))?
                    };
                    if !changed(seen) {
                        return Ok(());
                    }
                }
            }
            return Err(ArbiterError::Protocol("the watch stream ended".into()));
        }
        Err(ArbiterError::Unreachable {
            tried: self.endpoints(),
            last,
        })
    }
}

/// What a process needs to take part in arbitration: the cluster and who it is.
#[derive(Clone, Debug)]
pub struct Arbitration {
    pub client: Arbiter,
    pub me: Owner,
}

/// A fresh incarnation id for `label`: unique per process start (time and pid).
pub fn incarnation(label: &str) -> Owner {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Owner {
        id: format!("{:x}-{}", t, std::process::id()),
        label: label.to_string(),
    }
}

#[cfg(test)]
mod tests;
