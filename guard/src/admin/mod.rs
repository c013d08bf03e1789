//! The admin endpoint: what operators, Prometheus and `guard status` see
//! of a running daemon.
//!
//! - `/` the status page (static, embedded; its script reads `/status`),
//! - `/metrics` the OpenMetrics exposition ([`metrics`]),
//! - `/status` the same picture as JSON ([`status::Status`]),
//! - `/healthz` 200 while the process serves, `/readyz` 200 when
//!   configuration, XDP and at least one backend are in order,
//! - `/trace` starts `guard xdp trace` and serves its lines ([`trace`]).
//!
//! It can never slow the proxy. The picture is taken once per
//! [`SAMPLE_INTERVAL`] on a blocking thread ([`collect`]: atomics and the
//! XDP maps), rendered once, and every request answers with those bytes:
//! a flood of scrapes costs copies of a few kilobytes, not a walk of the
//! proxy's state per scrape. Connections are capped ([`MAX_CONNECTIONS`])
//! and timed out like any other client's.

pub mod client;
pub mod collect;
pub mod metrics;
pub mod status;
pub mod trace;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use log::{info, warn};
use subtle::ConstantTimeEq as _;
use tokio::{net::TcpListener, sync::Semaphore};

use collect::{History, Sources};

/// How often the picture is taken.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// Admin connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 32;

/// Requests answered a second, all connections together; the rest wait
/// their turn. Together with [`MAX_CONNECTIONS`] this bounds what the
/// endpoint can take from the runtime the proxy runs on, whatever its
/// clients do, while a scrape waits at most `MAX_CONNECTIONS /
/// MAX_REQUESTS_PER_SEC` seconds.
pub const MAX_REQUESTS_PER_SEC: u32 = 50;

/// How long a client has to send its request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest an admin connection is kept, however it is used.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The status page: one file, no build step, nothing fetched elsewhere.
const PAGE: &str = include_str!("page.html");

/// The latest picture, rendered.
struct Rendered {
    json: Bytes,
    metrics: Bytes,
    ready: bool,
    not_ready: String,
}

/// What the handlers share.
pub struct Admin {
    latest: ArcSwap<Rendered>,
    token: Option<String>,
    /// When the next request may be answered.
    next_slot: tokio::sync::Mutex<tokio::time::Instant>,
    /// `/trace`; `None`: this daemon runs no XDP guard.
    trace: Option<Arc<trace::TraceSource>>,
}

impl Admin {
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        // Constant time in the bytes compared; lengths differ only for a
        // wrong token, and the length is not the secret.
        given.as_bytes().ct_eq(token.as_bytes()).into()
    }
}

/// Binds the endpoint at `addr`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Serves the endpoint on `listener` until the task is aborted, taking
/// the picture from `sources`; `token`, when set, is required of every
/// request but the page itself and `/healthz`.
pub async fn serve(listener: TcpListener, sources: Sources, token: Option<String>) {
    let trace = sources.trace.clone();
    let sources = Arc::new(sources);
    let history = Arc::new(Mutex::new(History::default()));
    let first = take(sources.clone(), history.clone()).await;
    let admin = Arc::new(Admin {
        latest: ArcSwap::from_pointee(first),
        token: token.filter(|t| !t.is_empty()),
        next_slot: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        trace,
    });
    if let Ok(addr) = listener.local_addr() {
        info!("admin endpoint on http://{addr}/ (/metrics, /status, /healthz, /readyz, /trace)");
    }
    // Aborted with this future too: the daemon aborts `serve` itself, at
    // an await, where a line after `accept` would never run.
    let _sampling = AbortOnDrop(tokio::spawn(sample(admin.clone(), sources, history)));
    let app = router(admin);
    accept(listener, app).await;
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn take(sources: Arc<Sources>, history: Arc<Mutex<History>>) -> Rendered {
    let taken = tokio::task::spawn_blocking(move || {
        let mut h = history.lock().unwrap_or_else(|e| e.into_inner());
        let status = collect::collect(&sources, &mut h);
        Rendered {
            json: serde_json::to_vec(&status).unwrap_or_default().into(),
            metrics: metrics::render(&status).into(),
            ready: status.ready,
            not_ready: status.not_ready.join("; "),
        }
    })
    .await;
    taken.unwrap_or_else(|e| Rendered {
        json: Bytes::new(),
        metrics: Bytes::new(),
        ready: false,
        not_ready: format!("the status could not be taken: {e}"),
    })
}

async fn sample(admin: Arc<Admin>, sources: Arc<Sources>, history: Arc<Mutex<History>>) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let r = take(sources.clone(), history.clone()).await;
        admin.latest.store(Arc::new(r));
    }
}

fn router(admin: Arc<Admin>) -> Router {
    let guarded = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/status", get(status_handler))
        .route("/readyz", get(readyz))
        .route("/trace", get(trace::get).post(trace::post))
        .route_layer(middleware::from_fn_with_state(admin.clone(), require_token));
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .merge(guarded)
        .layer(middleware::from_fn_with_state(admin.clone(), pace))
        .with_state(admin)
}

/// Spaces requests [`MAX_REQUESTS_PER_SEC`] apart.
async fn pace(State(admin): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    let slot = {
        let mut next_slot = admin.next_slot.lock().await;
        let now = tokio::time::Instant::now();
        let slot = (*next_slot).max(now);
        *next_slot = slot + Duration::from_secs(1) / MAX_REQUESTS_PER_SEC;
        slot
    };
    tokio::time::sleep_until(slot).await;
    next.run(req).await
}

async fn require_token(State(admin): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    if admin.authorized(req.headers()) {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is required (Authorization: Bearer …)\n",
        )
            .into_response()
    }
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(admin): State<Arc<Admin>>) -> Response {
    let r = admin.latest.load();
    if r.ready {
        (StatusCode::OK, "ready\n".to_owned()).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", r.not_ready),
        )
            .into_response()
    }
}

async fn metrics_handler(State(admin): State<Arc<Admin>>) -> Response {
    let r = admin.latest.load();
    let mut resp = r.metrics.clone().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    resp
}

async fn status_handler(State(admin): State<Arc<Admin>>) -> Response {
    let r = admin.latest.load();
    let mut resp = r.json.clone().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Accepts up to [`MAX_CONNECTIONS`] at once; each is served by hyper
/// with a header timeout and a lifetime.
async fn accept(listener: TcpListener, app: Router) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, most likely: say so once a minute,
                // and let the proxy have them meanwhile.
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    warn!("admin endpoint: cannot accept: {e}");
                    last_warning = Some(tokio::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}
