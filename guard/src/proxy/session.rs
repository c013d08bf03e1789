//! One client connection: read, parse, dispatch, reply in order.
//!
//! The protocol is chosen from the first byte (0x80: binary, else text and
//! meta) and kept for the connection's life, as memcached does
//! ([`ClientConnection`]). Requests are dispatched as soon as they are
//! parsed, so a pipeline's requests run on their backends concurrently;
//! replies are written strictly in request order (`Pipeline`). The
//! client's side is read all along, even while replies are pending, so an
//! EOF or reset ends the session and frees its socket at once; replies
//! still in flight are dropped by the backend connections.
//!
//! With tenants configured a session starts unauthenticated
//! ([`super::auth`]): until the client authenticates it is served one
//! request at a time and only authentication gets anywhere. After that its
//! requests run as its identity: its tenant's namespace and key limit, and
//! read-only if its credential is. After a reload the session serves on as
//! its credential is now configured, and is closed if it no longer is.
//!
//! Every session ends for one [`SessionEnd`] reason, counted in `stats`
//! (`session_end_<reason>`) and logged at debug level. Ends that say
//! something about the source (churn, a lost stream, a cap, silence) are
//! counted against it for the escalation ladder ([`misbehaviour`]).

use std::{collections::VecDeque, net::IpAddr, pin::Pin, sync::Arc, task::Poll, time::Duration};

use bytes::BytesMut;
use log::{debug, info};
use tokio::{
    io::AsyncWriteExt as _,
    net::TcpStream,
    sync::watch,
    time::{Instant, Sleep, sleep_until},
};

use super::{
    Phase, Shared,
    command::{self, Client, Reply, Slot},
    connection::ClientConnection,
    stats::ProxyStats,
};
use crate::protocol::Next;

macro_rules! session_ends {
    ($( $(#[$doc:meta])* $name:ident = $label:literal, )*) => {
        /// Why a session ended.
        #[derive(Copy, Clone, Debug, PartialEq, Eq)]
        pub enum SessionEnd {
            $( $(#[$doc])* $name, )*
        }

        impl SessionEnd {
            /// Every reason, in the order `stats` lists them.
            pub const ALL: &'static [SessionEnd] = &[$(SessionEnd::$name,)*];

            /// The `stats` name of the counter of this reason.
            pub const fn stat_name(self) -> &'static str {
                match self { $(SessionEnd::$name => concat!("session_end_", $label),)* }
            }

            /// A short description for the log.
            pub const fn label(self) -> &'static str {
                match self { $(SessionEnd::$name => $label,)* }
            }
        }
    };
}

session_ends! {
    /// The client closed its side (EOF).
    ClientClosed = "client_closed",
    /// Reading from the client failed: it reset the connection.
    ClientReset = "client_reset",
    /// Writing to the client failed.
    WriteFailed = "write_failed",
    /// The client sent `quit`.
    Quit = "quit",
    /// Nothing arrived within `idle_timeout_secs`.
    Idle = "idle",
    /// A request was still arriving after `request_read_timeout_ms`.
    SlowRequest = "slow_request",
    /// A protocol error left the stream unreadable.
    ProtocolError = "protocol_error",
    /// Not authenticated within `auth_timeout_ms`.
    AuthTimeout = "auth_timeout",
    /// Its tenant was at its connection cap.
    TenantFull = "tenant_full",
    /// A reload revoked its credential.
    Revoked = "revoked",
    /// The proxy drained: everything that arrived before was answered.
    Drained = "drained",
    /// The proxy stopped (the drain's grace period ended).
    Stopped = "stopped",
}

/// Serves one client until it leaves, misbehaves beyond repair, idles out,
/// or the proxy stops; counts and logs why it ended.
/// `peer` is the address `accept` returned.
pub async fn serve(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    sh: Arc<Shared>,
    phase: watch::Receiver<Phase>,
) {
    let peer = peer.ip().to_canonical();
    let started = Instant::now();
    let (rd, wr) = stream.into_split();
    let mut conn = ClientConnection::new(rd, sh.limits.clone());
    let end = run(&mut conn, wr, &sh, phase, peer).await;
    let requested = conn.requests() > 0;
    // The socket is released as soon as the session ends.
    drop(conn);
    if let Some(counter) = sh.stats.session_ends.get(end as usize) {
        ProxyStats::add(counter, 1);
    }
    if let Some(e) = &sh.escalation
        && let Some(signal) = misbehaviour(end, started.elapsed(), e.churn_lifetime(), requested)
    {
        e.record(peer, signal);
    }
    debug!("session {}: ended ({})", peer, end.label());
}

/// What a session's end says against its source, for the escalation
/// ladder: a connection its client closed young (churn), a stream lost to
/// a protocol error, a tenant at its connection cap, or a deadline that
/// closed a connection which never sent a whole request.
pub fn misbehaviour(
    end: SessionEnd,
    lifetime: Duration,
    churn_lifetime: Duration,
    requested: bool,
) -> Option<crate::escalation::Signal> {
    use crate::escalation::Signal;
    match end {
        SessionEnd::ClientClosed
        | SessionEnd::ClientReset
        | SessionEnd::Quit
        | SessionEnd::WriteFailed
            if lifetime < churn_lifetime =>
        {
            Some(Signal::Churn)
        }
        SessionEnd::ProtocolError => Some(Signal::ProtocolError),
        SessionEnd::TenantFull => Some(Signal::Refused),
        SessionEnd::Idle | SessionEnd::AuthTimeout | SessionEnd::SlowRequest if !requested => {
            Some(Signal::Silent)
        }
        _ => None,
    }
}

async fn run(
    conn: &mut ClientConnection,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    sh: &Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
    peer: IpAddr,
) -> SessionEnd {
    match *phase.borrow() {
        Phase::Running => {}
        Phase::Draining => return SessionEnd::Drained,
        Phase::Stopped => return SessionEnd::Stopped,
    }
    // Subscribed before the registry is loaded: a reload in between only
    // costs a refresh.
    let reloads = sh.tenants.subscribe();
    let seen = *reloads.borrow();
    let registry = sh.tenants.load();
    let authenticated = registry.requires_auth();
    let (identity, _permit) = match registry.open_identity() {
        Some(open) => match sh.connections.try_acquire(&open.tenant) {
            Some(permit) => (open, permit),
            None => return SessionEnd::TenantFull,
        },
        None => {
            let login = super::auth::authenticate(conn, &mut wr, sh, registry, &mut phase, peer);
            match login.await {
                Ok(done) => done,
                Err(end) => return end,
            }
        }
    };
    // While it lasts, a session authenticated with a tenant's credential
    // keeps its source from being denied by escalation.
    let _login = sh
        .escalation
        .as_ref()
        .filter(|_| authenticated)
        .map(|e| e.logged_in(peer, identity.tenant.id));
    let mut session = Session {
        sh,
        peer,
        client: Client {
            budget: sh.budgets.get(&identity.tenant),
            identity,
            affinity: sh.router.affinity(),
            authenticated,
        },
        seen,
        reloads,
        pipeline: Pipeline::default(),
        state: State::Serving,
        reported: authenticated,
    };
    session.set_limits(conn);
    if *phase.borrow() != Phase::Running {
        session.state = State::Closing(SessionEnd::Drained);
    }
    session.serve(conn, wr, phase).await
}

/// Where a session is in its life.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum State {
    /// Reading and dispatching requests.
    Serving,
    /// The proxy began draining: what arrived before is dispatched, then
    /// the session closes.
    Draining,
    /// No new requests: pending replies are written, then the session
    /// ends for this reason.
    Closing(SessionEnd),
    /// A reply that closes the connection is out: end at once.
    Closed(SessionEnd),
}

/// Replies owed to the client, in request order.
#[derive(Default)]
struct Pipeline {
    slots: VecDeque<Slot>,
    /// A dispatched barrier (see `command::is_barrier`) is unanswered: it
    /// is the last slot, and nothing more is dispatched until it is
    /// answered.
    barrier: bool,
}

impl Pipeline {
    fn push(&mut self, slot: Slot, is_barrier: bool) {
        self.barrier = is_barrier && matches!(slot, Slot::Waiting(_));
        self.slots.push_back(slot);
    }

    /// Whether another request may be dispatched now.
    fn has_room(&self, depth: usize) -> bool {
        self.slots.len() < depth && !self.barrier
    }

    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Moves the replies ready at the front into `out`, in order. Returns
    /// `true` if one of them closes the connection: what follows it is
    /// dropped.
    fn take_ready(&mut self, out: &mut BytesMut) -> bool {
        while let Some(Slot::Ready(_)) = self.slots.front() {
            let Some(Slot::Ready(reply)) = self.slots.pop_front() else {
                unreachable!("the front was checked to be ready")
            };
            out.unsplit(reply.out);
            if reply.close {
                self.slots.clear();
                self.barrier = false;
                return true;
            }
        }
        false
    }

    fn front_waiting(&self) -> bool {
        matches!(self.slots.front(), Some(Slot::Waiting(_)))
    }

    /// The reply to the oldest request, once its backend answers.
    async fn front(&mut self) -> Reply {
        match self.slots.front_mut() {
            Some(Slot::Waiting(f)) => f.await,
            _ => std::future::pending().await,
        }
    }

    fn complete_front(&mut self, reply: Reply) {
        if let Some(front) = self.slots.front_mut() {
            *front = Slot::Ready(reply);
        }
        self.barrier &= self.slots.iter().any(|s| matches!(s, Slot::Waiting(_)));
    }

    /// Takes in, in order, the replies after the front that have already
    /// come, up to the first still waiting: a backend answers a pipeline's
    /// requests in one read, and without this each would cost the client
    /// its own write (and wake-up). Polled with the session's own waker,
    /// so a reply still waiting wakes the session as the front's would.
    async fn collect_ready(&mut self) {
        std::future::poll_fn(|cx| {
            for slot in self.slots.iter_mut() {
                if let Slot::Waiting(f) = slot {
                    match f.as_mut().poll(cx) {
                        Poll::Ready(reply) => *slot = Slot::Ready(reply),
                        Poll::Pending => break,
                    }
                }
            }
            Poll::Ready(())
        })
        .await;
        self.barrier &= self.slots.iter().any(|s| matches!(s, Slot::Waiting(_)));
    }
}

/// What one pass of parsing got through.
#[derive(Copy, Clone, Debug, Default)]
struct Progress {
    /// At least one whole request was parsed.
    parsed: bool,
    /// Parsing stopped inside a request.
    partial: bool,
    /// Parsing stopped at the pipeline's depth cap, maybe with whole
    /// requests still buffered.
    full: bool,
}

/// The idle and request-read deadlines, as one future.
struct Deadlines {
    idle: Option<Duration>,
    request: Option<Duration>,
    last_read: Instant,
    /// When the request at the head of the buffer started to arrive.
    partial_since: Option<Instant>,
    /// Long-lived, so a request costs no timer registration: re-armed only
    /// when it fires.
    idle_timer: Pin<Box<Sleep>>,
}

impl Deadlines {
    fn new(idle: Option<Duration>, request: Option<Duration>) -> Self {
        let idle = idle.map(|t| t.min(NEVER));
        let now = Instant::now();
        Self {
            idle,
            request,
            last_read: now,
            partial_since: None,
            idle_timer: Box::pin(sleep_until(now + idle.unwrap_or(NEVER))),
        }
    }

    fn read(&mut self) {
        self.last_read = Instant::now();
    }

    /// What the last parse did: a request still arriving starts (or
    /// keeps) its clock, counted from the end of the last whole one.
    fn progress(&mut self, progress: Progress) {
        if progress.parsed || !progress.partial {
            self.partial_since = None;
        }
        if progress.partial && self.partial_since.is_none() {
            self.partial_since = Some(Instant::now());
        }
    }

    /// Ends when a deadline passes: idle once nothing is pending
    /// (`pending` is fixed while this waits), or a request too slow to
    /// arrive.
    async fn expired(&mut self, pending: bool) -> SessionEnd {
        let request_deadline = self.request.zip(self.partial_since).map(|(t, s)| s + t);
        loop {
            tokio::select! {
                () = &mut self.idle_timer, if self.idle.is_some() => {
                    // Fires once per idle period, not re-armed per
                    // request: idle only once nothing is pending and
                    // nothing arrived.
                    let (t, now) = (self.idle.unwrap_or(NEVER), Instant::now());
                    let due = self.last_read + t;
                    if !pending && now >= due {
                        return SessionEnd::Idle;
                    }
                    // Replies pending: look again shortly after they are out.
                    let next = if now >= due { now + t.min(IDLE_RECHECK) } else { due };
                    self.idle_timer.as_mut().reset(next);
                }
                () = async {
                    match request_deadline {
                        Some(d) => sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => return SessionEnd::SlowRequest,
            }
        }
    }
}

/// An authenticated session.
struct Session<'a> {
    sh: &'a Arc<Shared>,
    peer: IpAddr,
    client: Client,
    reloads: watch::Receiver<u64>,
    /// The registry version this session's identity reflects.
    seen: u64,
    pipeline: Pipeline,
    state: State,
    /// Its source was reported to the XDP side (a login reports itself;
    /// an open-tenant client at its first valid request).
    reported: bool,
}

impl Session<'_> {
    async fn serve(
        &mut self,
        conn: &mut ClientConnection,
        mut wr: tokio::net::tcp::OwnedWriteHalf,
        phase: watch::Receiver<Phase>,
    ) -> SessionEnd {
        let sh = self.sh;
        let mut out = BytesMut::new();
        let mut deadlines = Deadlines::new(sh.idle_timeout, sh.request_read_timeout);
        // Long-lived, so a request costs no watch subscription either.
        let mut control = Box::pin(next_control(phase, self.reloads.clone()));
        loop {
            let progress = match self.dispatch(conn) {
                Ok(progress) => progress,
                Err(end) => return end,
            };
            if self.state == State::Draining && self.pipeline.has_room(sh.max_pipeline_depth) {
                // Everything that arrived before the drain is dispatched
                // (not merely held back by a flush or the depth cap).
                self.state = State::Closing(SessionEnd::Drained);
            }
            if self.pipeline.take_ready(&mut out) {
                self.state = match self.state {
                    State::Closing(end) | State::Closed(end) => State::Closed(end),
                    _ => State::Closed(SessionEnd::Quit),
                };
            }
            if !out.is_empty() {
                if wr.write_all(&out).await.is_err() {
                    return SessionEnd::WriteFailed;
                }
                out.clear();
            }
            match self.state {
                State::Closed(end) => return end,
                State::Closing(end) if self.pipeline.is_empty() => return end,
                _ => {}
            }
            // Replies guard wrote itself (refusals, `mn`, …) made room, and
            // no backend reply or new byte may come to wake us: dispatch
            // what is buffered now.
            if progress.full && self.pipeline.has_room(sh.max_pipeline_depth) {
                continue;
            }

            let waiting = self.pipeline.front_waiting();
            // Keep reading while replies are pending, to notice the client
            // leaving; the cap bounds what one client can make us buffer.
            // While a drain waits to dispatch what was buffered, nothing
            // new is read: it would not be served.
            let can_read = self.state != State::Draining && conn.buffered() < sh.read_cap;
            deadlines.progress(progress);
            if conn.buffered() == 0 && self.pipeline.is_empty() {
                // Between requests a client holds no buffer: idle
                // connections are what a reconnect storm leaves behind by
                // the thousand.
                conn.release_buffer();
            }
            let pending = !self.pipeline.is_empty();
            tokio::select! {
                r = conn.read_some(), if can_read => match r {
                    Ok(0) => return SessionEnd::ClientClosed,
                    Err(_) => return SessionEnd::ClientReset,
                    Ok(_) => {
                        deadlines.read();
                        if matches!(self.state, State::Closing(_)) {
                            // Draining: what arrives now is not served.
                            conn.reader().clear();
                        }
                    }
                },
                reply = self.pipeline.front(), if waiting => {
                    self.pipeline.complete_front(reply);
                    self.pipeline.collect_ready().await;
                },
                end = deadlines.expired(pending) => {
                    if end == SessionEnd::SlowRequest {
                        ProxyStats::add(&sh.stats.request_read_timeouts, 1);
                    }
                    return end;
                },
                (event, p, r) = &mut control => {
                    control = Box::pin(next_control(p, r));
                    match event {
                        Control::Phase(Phase::Running) => {}
                        Control::Phase(Phase::Draining) => {
                            // What the client sent before the drain began
                            // is in flight from its side: serve what
                            // already arrived.
                            conn.drain_socket(sh.read_cap);
                            if self.state == State::Serving {
                                self.state = State::Draining;
                            }
                        }
                        Control::Phase(Phase::Stopped) | Control::Gone => return SessionEnd::Stopped,
                        // Idle sessions of a revoked credential are closed too.
                        Control::Reload => {
                            if !self.refresh(conn) {
                                return SessionEnd::Revoked;
                            }
                        }
                    }
                },
            }
        }
    }

    /// Parses and dispatches what is buffered, while the pipeline has
    /// room. Returns what parsing got through (for the request-read
    /// deadline), or why the session must end.
    fn dispatch(&mut self, conn: &mut ClientConnection) -> Result<Progress, SessionEnd> {
        let sh = self.sh;
        let mut progress = Progress::default();
        while matches!(self.state, State::Serving | State::Draining) {
            if !self.pipeline.has_room(sh.max_pipeline_depth) {
                progress.full = true;
                break;
            }
            // A reload not yet seen by the control wait: no request runs
            // under a revoked credential. One atomic load when nothing was
            // reloaded.
            if conn.buffered() > 0 && self.reloads.has_changed().unwrap_or(false) {
                self.reloads.mark_unchanged();
                if !self.refresh(conn) {
                    return Err(SessionEnd::Revoked);
                }
            }
            let buffered = conn.buffered();
            match conn.next_request() {
                Next::Empty => break,
                Next::Partial => {
                    progress.partial = true;
                    break;
                }
                Next::Frame(req) => {
                    progress.parsed = true;
                    if !self.reported {
                        self.reported = true;
                        self.report_source();
                    }
                    let is_barrier = command::is_barrier(&req);
                    // What the request took from the buffer: its bytes as
                    // sent, for its tenant's byte budget.
                    let size = buffered.saturating_sub(conn.buffered());
                    let slot = command::dispatch(req, size, sh, &self.client);
                    if let Slot::Ready(Reply { close: true, .. }) = slot {
                        self.state = State::Closing(SessionEnd::Quit);
                    }
                    self.pipeline.push(slot, is_barrier);
                }
                Next::Error(e) => {
                    ProxyStats::add(&sh.stats.protocol_errors, 1);
                    let mut reply = Reply {
                        out: BytesMut::new(),
                        close: e.close,
                    };
                    e.write_reply(&mut reply.out);
                    if e.close {
                        self.state = State::Closing(SessionEnd::ProtocolError);
                    }
                    self.pipeline.push(Slot::Ready(reply), false);
                }
            }
        }
        Ok(progress)
    }

    /// Tells the XDP side (if any) that this open-tenant client sent a valid
    /// request from its address: no spoofed source gets this far, so its
    /// SYNs may skip the budgets a spoofed flood exhausts. Best effort: a
    /// full channel drops the report.
    fn report_source(&self) {
        if let Some(tx) = &self.sh.learned {
            let _ = tx.try_send(super::Learned {
                source: self.peer,
                tenant: self.client.identity.tenant.id,
                credential: 0,
            });
        }
    }

    /// The limits the client's requests are parsed with: the proxy's, with
    /// its tenant's key limit.
    fn set_limits(&self, conn: &mut ClientConnection) {
        let mut limits = self.sh.limits.clone();
        limits.max_key_len = self.client.identity.tenant.namespace.max_client_key_len();
        conn.reader().set_limits(limits);
    }

    /// After a reload not yet `seen`: serves on as the session's credential
    /// now stands (rights, namespace), or returns `false` if it was
    /// revoked. The parse loop and the control wait both notice a reload;
    /// `seen` makes the second a no-op.
    fn refresh(&mut self, conn: &mut ClientConnection) -> bool {
        let version = self.sh.tenants.version();
        if version == self.seen {
            return true;
        }
        self.seen = version;
        match self.sh.tenants.load().refresh(&self.client.identity) {
            Some(identity) => {
                self.client.identity = identity;
                self.set_limits(conn);
                true
            }
            None => {
                info!(
                    "closing {} ({}): its credential is no longer configured",
                    self.peer,
                    self.client
                        .identity
                        .username
                        .as_deref()
                        .unwrap_or("open tenant")
                );
                false
            }
        }
    }
}

/// How soon an idle timer that fired with replies pending looks again.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// Far enough to never fire: the idle timer without an idle timeout.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// What a session hears from the proxy between requests.
enum Control {
    Phase(Phase),
    Reload,
    /// The proxy is gone.
    Gone,
}

/// The next phase change or reload; gives the receivers back for the next
/// wait.
async fn next_control(
    mut phase: watch::Receiver<Phase>,
    mut reloads: watch::Receiver<u64>,
) -> (Control, watch::Receiver<Phase>, watch::Receiver<u64>) {
    let event = tokio::select! {
        r = phase.changed() => match r {
            Ok(()) => Control::Phase(*phase.borrow_and_update()),
            Err(_) => Control::Gone,
        },
        r = reloads.changed() => match r {
            Ok(()) => Control::Reload,
            Err(_) => Control::Gone,
        },
    };
    (event, phase, reloads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::escalation::Signal;

    #[test]
    fn only_ends_that_say_something_against_the_source_count() {
        let churn = Duration::from_secs(1);
        let young = Duration::from_millis(10);
        let old = Duration::from_secs(5);
        let m = |end, lifetime, requested| misbehaviour(end, lifetime, churn, requested);
        for end in [
            SessionEnd::ClientClosed,
            SessionEnd::ClientReset,
            SessionEnd::Quit,
            SessionEnd::WriteFailed,
        ] {
            assert_eq!(m(end, young, true), Some(Signal::Churn), "{end:?}");
            assert_eq!(m(end, old, true), None, "{end:?} after a while");
        }
        assert_eq!(
            m(SessionEnd::ProtocolError, old, true),
            Some(Signal::ProtocolError)
        );
        assert_eq!(
            m(SessionEnd::TenantFull, young, true),
            Some(Signal::Refused)
        );
        for end in [
            SessionEnd::Idle,
            SessionEnd::AuthTimeout,
            SessionEnd::SlowRequest,
        ] {
            assert_eq!(m(end, old, false), Some(Signal::Silent), "{end:?}");
            assert_eq!(m(end, old, true), None, "{end:?} after a request");
        }
        // The proxy's own doing says nothing about the client.
        for end in [
            SessionEnd::Revoked,
            SessionEnd::Drained,
            SessionEnd::Stopped,
        ] {
            assert_eq!(m(end, young, false), None, "{end:?}");
        }
    }

    fn reply(b: &[u8]) -> Reply {
        Reply {
            out: BytesMut::from(b),
            close: false,
        }
    }

    fn answered(b: &'static [u8]) -> Slot {
        Slot::Waiting(Box::pin(async move { reply(b) }))
    }

    async fn settle_front(p: &mut Pipeline) {
        let r = p.front().await;
        p.complete_front(r);
        p.collect_ready().await;
    }

    #[tokio::test]
    async fn replies_already_in_go_out_in_one_write() {
        let mut p = Pipeline::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<Reply>();
        p.push(answered(b"1"), false);
        p.push(answered(b"2"), false);
        p.push(
            Slot::Waiting(Box::pin(async move { rx.await.expect("sent") })),
            false,
        );
        p.push(answered(b"4"), true);
        settle_front(&mut p).await;
        let mut out = BytesMut::new();
        p.take_ready(&mut out);
        // Everything up to the reply still waiting, in order, at once.
        assert_eq!(&out[..], b"12");
        assert!(!p.has_room(usize::MAX), "the barrier is still unanswered");
        tx.send(reply(b"3")).expect("receiver");
        settle_front(&mut p).await;
        p.take_ready(&mut out);
        assert_eq!(&out[..], b"1234");
        assert!(p.is_empty() && p.has_room(1));
    }
}
