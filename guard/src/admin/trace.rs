//! `/trace`: starting, stopping and reading `guard xdp trace` through the
//! admin endpoint.
//!
//! - `POST /trace` with `{"cidr": "192.0.2.7/32", "secs": 30}` starts a
//!   trace of the prefix (`secs` at most [`MAX_TRACE_SECS`], default
//!   [`DEFAULT_TRACE_SECS`]; 0 stops it, with `"id"` only if it is that
//!   trace) and answers [`Started`];
//! - `GET /trace?since=SEQ` answers [`TraceAnswer`]: the lines after
//!   `SEQ` (at most [`MAX_LINES_PER_ANSWER`]) and the traces running.
//!
//! Both are token-protected like `/status`, and paced with every other
//! request of the endpoint.

use std::sync::{Arc, Mutex};

use axum::{
    extract::State,
    http::{StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::Admin;
use crate::{
    cidr::Cidr,
    ebpf::{
        maps::{GuardMaps, monotonic_ns},
        trace::{self, DEFAULT_TRACE_SECS, MAX_LINES_PER_ANSWER, MAX_TRACE_SECS, Started},
    },
    paths::Paths,
};

pub use trace::{TraceLine, TraceRing};

/// Largest `POST /trace` body read.
const MAX_BODY: usize = 1024;

/// What `/trace` works with: the daemon's ring of lines and its pins.
pub struct TraceSource {
    ring: Arc<TraceRing>,
    paths: Paths,
    maps: Mutex<Option<GuardMaps>>,
}

impl TraceSource {
    /// The ring the daemon's trace logger fills, and the guard pinned
    /// under `paths`.
    pub fn new(ring: Arc<TraceRing>, paths: Paths) -> Self {
        Self {
            ring,
            paths,
            maps: Mutex::new(None),
        }
    }

    /// Runs `f` on the pinned maps, opened once and kept.
    fn with_maps<R>(
        &self,
        f: impl FnOnce(&mut GuardMaps) -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if m.is_none() {
            *m = Some(trace::open_maps(&self.paths)?);
        }
        f(m.as_mut().expect("opened above"))
    }
}

/// `POST /trace`'s body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRequest {
    /// The prefix, e.g. `192.0.2.7/32` (an address alone is its /32 or
    /// /128).
    pub cidr: String,
    /// How long, in seconds; 0 stops the prefix's trace.
    pub secs: Option<u64>,
    /// With `secs` 0: stop the prefix's trace only if it is this one.
    #[serde(default)]
    pub id: Option<u32>,
}

/// A running trace, in [`TraceAnswer`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningTrace {
    /// Its id, in its lines.
    pub id: u32,
    /// The prefix.
    pub cidr: Cidr,
    /// Seconds until it ends.
    pub ends_in_secs: u64,
}

/// `GET /trace`'s answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceAnswer {
    /// The last line's sequence number: the next `since`.
    pub last_seq: u64,
    /// Lines after the `since` asked for, oldest first. If more than
    /// [`MAX_LINES_PER_ANSWER`] are waiting, the newest wait for the next
    /// request; if the ring dropped some, the first `seq` is past
    /// `since + 1`.
    pub lines: Vec<TraceLine>,
    /// The traces in force.
    pub traces: Vec<RunningTrace>,
}

fn problem(code: StatusCode, msg: impl std::fmt::Display) -> Response {
    (code, format!("{msg}\n")).into_response()
}

fn json<T: Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `since=N` from a query string; 0 when absent.
fn since(uri: &Uri) -> Result<u64, String> {
    let Some(q) = uri.query() else {
        return Ok(0);
    };
    for pair in q.split('&') {
        if let Some(v) = pair.strip_prefix("since=") {
            return v
                .parse()
                .map_err(|_| format!("since must be a sequence number, not {v:?}"));
        }
    }
    Ok(0)
}

/// `GET /trace?since=SEQ`.
pub(super) async fn get(State(admin): State<Arc<Admin>>, uri: Uri) -> Response {
    let Some(source) = admin.trace.clone() else {
        return problem(StatusCode::NOT_FOUND, "this daemon runs no XDP guard");
    };
    let since = match since(&uri) {
        Ok(s) => s,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e),
    };
    let answer = tokio::task::spawn_blocking(move || {
        let (lines, last_seq) = source.ring.since(since);
        debug_assert!(lines.len() <= MAX_LINES_PER_ANSWER);
        let now = monotonic_ns();
        let traces = source
            .with_maps(|m| m.trace_rules())
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, r)| r.active(now))
            .map(|(cidr, r)| RunningTrace {
                id: r.id,
                cidr,
                ends_in_secs: r.expires_ns.saturating_sub(now).div_ceil(1_000_000_000),
            })
            .collect();
        TraceAnswer {
            last_seq,
            lines,
            traces,
        }
    })
    .await;
    match answer {
        Ok(a) => json(&a),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `POST /trace`.
pub(super) async fn post(State(admin): State<Arc<Admin>>, body: Bytes) -> Response {
    let Some(source) = admin.trace.clone() else {
        return problem(StatusCode::NOT_FOUND, "this daemon runs no XDP guard");
    };
    if body.len() > MAX_BODY {
        return problem(StatusCode::PAYLOAD_TOO_LARGE, "the request is too large");
    }
    let req: TraceRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"cidr\": \"ADDR/LEN\", \"secs\": N}}: {e}"),
            );
        }
    };
    let cidr: Cidr = match req.cidr.parse() {
        Ok(c) => c,
        Err(e) => return problem(StatusCode::BAD_REQUEST, format!("cidr: {e}")),
    };
    let secs = req.secs.unwrap_or(DEFAULT_TRACE_SECS);
    if secs > MAX_TRACE_SECS {
        return problem(
            StatusCode::BAD_REQUEST,
            format!("secs: a trace lasts at most {MAX_TRACE_SECS} s"),
        );
    }
    let started = tokio::task::spawn_blocking(move || {
        // Taken before the rule exists: every line of the new trace comes
        // after it.
        let (_, last) = source.ring.since(u64::MAX);
        source
            .with_maps(|m| trace::start(m, cidr, secs, req.id))
            .map(|s| Started { since: last, ..s })
    })
    .await;
    match started {
        Ok(Ok(s)) => {
            if s.secs > 0 {
                log::info!("trace {} of {} started for {} s", s.id, s.cidr, s.secs);
            } else {
                log::info!("trace of {} stopped", s.cidr);
            }
            json(&s)
        }
        Ok(Err(e)) => problem(StatusCode::CONFLICT, format!("{e:#}")),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_read_from_the_query() {
        let u = |s: &str| s.parse::<Uri>().unwrap();
        assert_eq!(since(&u("/trace")), Ok(0));
        assert_eq!(since(&u("/trace?since=42")), Ok(42));
        assert_eq!(since(&u("/trace?x=1&since=7")), Ok(7));
        assert!(since(&u("/trace?since=-1")).is_err());
        assert!(since(&u("/trace?since=99999999999999999999999")).is_err());
    }
}
