//! A session before its client has authenticated (tenants configured).
//!
//! Requests are served one at a time, and only authentication gets
//! anywhere: binary `SASL_LIST_MECHS`/`SASL_AUTH` (PLAIN) and `VERSION`,
//! or memcached's `-Y` text form (a `set` whose value is
//! `username password`); everything else is answered as memcached answers
//! it before authentication ([`crate::tenant::auth`]) and the connection
//! stays open to try again. Values are capped small, so an unauthenticated
//! client cannot make us buffer much.
//!
//! The whole exchange runs under the `auth_timeout_ms` deadline, counted
//! from the connection: a client that has not authenticated by then is
//! closed. Passwords are checked from the verifier's cache when it can
//! answer, else with PBKDF2 on a blocking thread. Once the password is
//! right the tenant's connection cap is taken; a tenant at its cap gets
//! `SERVER_ERROR too many connections` (binary: 0x86 with that text) and
//! the connection is closed. A success is reported (source address and
//! tenant id) to the XDP side, if it listens.

use std::{future::Future, net::IpAddr, pin::Pin, sync::Arc};

use bytes::BytesMut;
use tokio::{
    io::AsyncWriteExt as _,
    net::tcp::OwnedWriteHalf,
    sync::watch,
    time::{Instant, sleep_until},
};

use super::{Phase, Shared, connection::ClientConnection, session::SessionEnd, stats::ProxyStats};
use crate::{
    protocol::{BinaryRequest, BinaryResponse, Next, Opcode, Request, Status},
    tenant::{
        AuthError, ConnectionPermit, Identity, TenantRegistry,
        auth::{self, Credentials},
    },
};

/// Largest value accepted before authentication: a SASL PLAIN message or
/// an auth `set` is a few hundred bytes at most.
const MAX_AUTH_VALUE: usize = 1024;
/// Most bytes buffered from an unauthenticated client.
const MAX_AUTH_BUFFER: usize = 16 * 1024;
/// Text reply: the tenant is at its connection cap.
pub const TEXT_TOO_MANY_CONNECTIONS: &[u8] = b"SERVER_ERROR too many connections\r\n";

/// How to answer the request that carried the credentials.
enum Asker {
    Text,
    Binary(BinaryRequest),
}

type Verification = Pin<Box<dyn Future<Output = Result<Arc<Identity>, AuthError>> + Send>>;

/// Checks `creds` without blocking the async threads: from the cache when
/// it answers, else PBKDF2 on a blocking thread.
fn verify(registry: &Arc<TenantRegistry>, creds: Credentials) -> Verification {
    if let Some(r) = registry.authenticate_cached(&creds.username, &creds.password) {
        return Box::pin(std::future::ready(r));
    }
    let registry = registry.clone();
    Box::pin(async move {
        tokio::task::spawn_blocking(move || registry.authenticate(&creds.username, &creds.password))
            .await
            .unwrap_or(Err(AuthError::Busy))
    })
}

/// What one request before authentication amounts to.
enum Step {
    /// Answer this and read on.
    Reply(BytesMut),
    /// Check these credentials, then answer `Asker`.
    Verify(Credentials, Asker),
}

fn encode(resp: BinaryResponse) -> BytesMut {
    let mut out = BytesMut::new();
    resp.encode(&mut out);
    out
}

fn step(req: Request) -> Step {
    match req {
        Request::Binary(b) => match b.opcode {
            Opcode::SaslListMechs => Step::Reply(encode(auth::sasl_list_mechs_response(&b))),
            Opcode::SaslAuth | Opcode::SaslStep => match auth::sasl_auth_credentials(&b) {
                Ok(creds) => Step::Verify(creds, Asker::Binary(b)),
                Err(_) => Step::Reply(encode(auth::sasl_auth_failed(
                    &b,
                    AuthError::InvalidCredentials,
                ))),
            },
            Opcode::Version => Step::Reply(encode(BinaryResponse {
                value: bytes::Bytes::from(super::version()),
                ..BinaryResponse::new(b.opcode as u8, b.opaque)
            })),
            _ => Step::Reply(encode(auth::binary_unauthenticated(&b))),
        },
        other => match auth::request_auth_credentials(&other) {
            Ok(creds) => Step::Verify(creds, Asker::Text),
            Err(e) => Step::Reply(BytesMut::from(e.reply())),
        },
    }
}

/// Serves the client until it authenticates: returns its identity and
/// its tenant connection permit, or why the session is over (deadline,
/// client gone, tenant at its cap, proxy stopping, a protocol error that
/// closes). Bytes after the authenticating request stay buffered in
/// `conn` for the session.
pub async fn authenticate(
    conn: &mut ClientConnection,
    wr: &mut OwnedWriteHalf,
    sh: &Shared,
    registry: Arc<TenantRegistry>,
    phase: &mut watch::Receiver<Phase>,
    peer: IpAddr,
) -> Result<(Arc<Identity>, ConnectionPermit), SessionEnd> {
    let deadline = Instant::now() + sh.auth_timeout;
    let mut limits = conn.reader().limits().clone();
    limits.max_value_len = limits.max_value_len.min(MAX_AUTH_VALUE);
    conn.reader().set_limits(limits);
    let mut out = BytesMut::new();
    let mut pending: Option<(Verification, Asker)> = None;
    loop {
        let mut close = false;
        while pending.is_none() && !close {
            match conn.next_request() {
                Next::Empty | Next::Partial => break,
                Next::Frame(req) => match step(req) {
                    Step::Reply(r) => out.unsplit(r),
                    Step::Verify(creds, asker) => {
                        ProxyStats::add(&sh.stats.auth_cmds, 1);
                        pending = Some((verify(&registry, creds), asker));
                    }
                },
                Next::Error(e) => {
                    ProxyStats::add(&sh.stats.protocol_errors, 1);
                    e.write_reply(&mut out);
                    close = e.close;
                }
            }
        }
        if !out.is_empty() {
            if wr.write_all(&out).await.is_err() {
                return Err(SessionEnd::WriteFailed);
            }
            out.clear();
        }
        if close {
            return Err(SessionEnd::ProtocolError);
        }
        let can_read = conn.buffered() < MAX_AUTH_BUFFER;
        tokio::select! {
            r = conn.read_some(), if can_read => match r {
                Ok(0) => return Err(SessionEnd::ClientClosed),
                Err(_) => return Err(SessionEnd::ClientReset),
                Ok(_) => {}
            },
            result = async {
                match &mut pending {
                    Some((v, _)) => v.await,
                    None => std::future::pending().await,
                }
            }, if pending.is_some() => {
                let (_, asker) = pending.take().expect("pending");
                match result {
                    Ok(identity) => {
                        let Some(permit) = sh.connections.try_acquire(&identity.tenant) else {
                            ProxyStats::add(&sh.stats.tenant_rejected_connections, 1);
                            let reply = match &asker {
                                Asker::Text => BytesMut::from(TEXT_TOO_MANY_CONNECTIONS),
                                Asker::Binary(b) => encode(BinaryResponse {
                                    status: Status::TEMPORARY_FAILURE,
                                    value: bytes::Bytes::from_static(b"too many connections"),
                                    ..BinaryResponse::new(b.opcode as u8, b.opaque)
                                }),
                            };
                            let _ = wr.write_all(&reply).await;
                            return Err(SessionEnd::TenantFull);
                        };
                        let reply = match &asker {
                            Asker::Text => BytesMut::from(auth::TEXT_AUTH_OK),
                            Asker::Binary(b) => encode(auth::sasl_auth_ok(b)),
                        };
                        if wr.write_all(&reply).await.is_err() {
                            return Err(SessionEnd::WriteFailed);
                        }
                        if let Some(tx) = &sh.learned {
                            let _ = tx.try_send(super::Learned {
                                source: peer,
                                tenant: identity.tenant.id,
                                credential: identity.credential_id(),
                            });
                        }
                        return Ok((identity, permit));
                    }
                    Err(e) => {
                        ProxyStats::add(&sh.stats.auth_errors, 1);
                        if let Some(r) = &sh.escalation {
                            r.record(peer, crate::escalation::Signal::AuthFailure);
                        }
                        out.unsplit(match &asker {
                            Asker::Text => BytesMut::from(auth::text_auth_reply::<()>(&Err(e))),
                            Asker::Binary(b) => encode(auth::sasl_auth_failed(b, e)),
                        });
                    }
                }
            },
            () = sleep_until(deadline) => {
                ProxyStats::add(&sh.stats.auth_timeouts, 1);
                return Err(SessionEnd::AuthTimeout);
            },
            r = phase.changed() => match r.map(|()| *phase.borrow()) {
                Ok(Phase::Running) => {}
                Ok(Phase::Draining) => return Err(SessionEnd::Drained),
                Ok(Phase::Stopped) | Err(_) => return Err(SessionEnd::Stopped),
            },
        }
    }
}
