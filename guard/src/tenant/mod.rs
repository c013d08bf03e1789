//! Tenants: who a client is, which keys it sees, what it may spend.
//!
//! A pure library the proxy sessions call; it does no I/O.
//!
//! - [`TenantRegistry`] is built from a validated [`Config`]: one per
//!   configuration, swapped whole on reload ([`SharedRegistry`]). With no
//!   credentials configured it is *open*: every connection is the single
//!   open tenant, whose keys live in [`namespace::OPEN_NAMESPACE`] (so its
//!   `flush_all` is a generation too), or with `[proxy] keys = "raw"` in
//!   the raw key space ([`KeyNamespace::raw`]), and no authentication is
//!   asked for ([`TenantRegistry::requires_auth`]). Otherwise every
//!   connection must authenticate before anything else, within
//!   [`AUTH_DEADLINE`] (the proxy's `[proxy] auth_timeout_ms` defaults to
//!   it).
//! - [`TenantRegistry::authenticate`] checks a username and password and
//!   returns the connection's [`Identity`]: its [`Tenant`] and whether it
//!   is read-only. Verification is PBKDF2 ([`password`]) behind a cache,
//!   a concurrency bound and a failure cache ([`verifier`]), so a reconnect
//!   storm of correct passwords costs one HMAC each, and wrong passwords
//!   cannot take more than a bounded number of cores.
//! - [`KeyNamespace`] prefixes every key with the tenant's namespace and
//!   flush generation (a raw open tenant's keys stay as sent); `flush_all`
//!   moves only that tenant on.
//! - [`auth`] has the wire side: SASL PLAIN (binary), memcached's `-Y`
//!   text authentication, and the replies.
//! - [`TenantLimits`] are a tenant's budgets on this host: its own or
//!   `[proxy]`'s, divided by `[proxy] hosts` ([`TenantLimits::resolve`]).
//!   [`TenantConnections`] caps its connections, and [`budget`] enforces
//!   its requests per second, bytes per second and backend requests in
//!   flight ([`TenantBudgets`]; charged once per request by
//!   `proxy::command::dispatch`, refused at once when over).
//!
//! How a session uses it:
//!
//! ```ignore
//! let registry = shared.load();                 // Arc<TenantRegistry>
//! let identity = match registry.open_identity() {
//!     Some(open) => open,
//!     None => {
//!         // Within AUTH_DEADLINE: read SASL_AUTH or the text `set`, then
//!         let creds = auth::sasl_auth_credentials(&req)?;  // or text_auth_credentials
//!         let r = match registry.authenticate_cached(&creds.username, &creds.password) {
//!             Some(r) => r,                       // no hashing needed
//!             None => {                           // PBKDF2: off the async threads
//!                 let reg = registry.clone();
//!                 tokio::task::spawn_blocking(move || {
//!                     reg.authenticate(&creds.username, &creds.password)
//!                 }).await?
//!             }
//!         };
//!         // reply with auth::text_auth_reply(&r) / sasl_auth_ok / sasl_auth_failed
//!         r?
//!     }
//! };
//! let _permit = connections.try_acquire(&identity.tenant)
//!     .ok_or("SERVER_ERROR too many connections")?;
//! let budget = budgets.get(&identity.tenant);      // Arc<TenantBudget>, kept by the session
//! // Per request, with the identity as the latest reload left it:
//! let charge = budget.admit(&identity.tenant, Cost { requests: keys, bytes: request_len })
//!     .map_err(|over| format!("SERVER_ERROR {}", over.reply_text()))?;
//! let backend_key = identity.tenant.namespace.backend_key(&client_key)?;
//! // … send, await the reply, then:
//! charge.reply(reply.len());                      // reply bytes, after the fact; slots released
//! ```

pub mod auth;
pub mod budget;
pub mod connections;
pub mod namespace;
pub use crate::password;
pub mod verifier;

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use guard_common::DEFAULT_TENANT;
use tokio::sync::watch;

pub use budget::{Charge, Cost, OverBudget, TenantBudget, TenantBudgets};
pub use connections::{ConnectionPermit, TenantConnections};
pub use namespace::{KeyNamespace, KeyTooLong};
pub use password::PasswordHash;
pub use verifier::{AuthSettings, AuthStats};

use crate::config::{Config, KeyMode, ProxyConfig, TenantConfig, tenant_id};
use verifier::{Candidate, Verifier};

/// How long a client has to authenticate after connecting, unless the
/// proxy's `auth_timeout_ms` says otherwise. Short: a client that cannot
/// authenticate at once is not going to, and its descriptor is wanted.
pub const AUTH_DEADLINE: Duration = crate::config::DEFAULT_AUTH_TIMEOUT;

/// Name of the open tenant (no credentials configured).
pub const OPEN_TENANT: &str = "default";

/// A tenant's budgets on this host; 0 means unlimited. The file's
/// budgets are service-wide (the tenant's own, else `[proxy]`'s), and
/// each of `[proxy] hosts` proxy hosts enforces its share
/// ([`crate::config::per_host`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantLimits {
    /// Client connections at once.
    pub max_connections: u64,
    /// Backend requests per second (a multi-get counts each key).
    pub max_requests_per_sec: u64,
    /// Requests that may be spent at once from a full bucket.
    pub requests_burst: u64,
    /// Request and reply bytes per second.
    pub max_bytes_per_sec: u64,
    /// Bytes that may be spent at once from a full bucket.
    pub bytes_burst: u64,
    /// Backend requests in flight at once.
    pub max_in_flight: u64,
}

impl TenantLimits {
    /// `None` for unlimited (0), else the limit.
    pub fn limit(value: u64) -> Option<u64> {
        (value != 0).then_some(value)
    }

    /// The limits on this host of `tenant` (`None`: the open tenant) under
    /// `proxy`: each budget the tenant leaves unset is `[proxy]`'s; a
    /// burst left unset is one second of its rate, and is `[proxy]`'s
    /// only when the rate is too (a burst sized for another rate means
    /// nothing); then every budget is divided by `proxy.hosts`.
    pub fn resolve(tenant: Option<&TenantConfig>, proxy: &ProxyConfig) -> Self {
        let hosts = proxy.hosts;
        let share = |v: u64| crate::config::per_host(v, hosts);
        let pair = |rate: Option<u64>, burst: Option<u64>, default: u64, default_burst| {
            let (rate, burst) = match rate {
                Some(r) => (r, burst.unwrap_or(r)),
                None => (default, burst.or(default_burst).unwrap_or(default)),
            };
            match rate {
                0 => (0, 0),
                r => (share(r), share(burst)),
            }
        };
        let (requests, requests_burst) = pair(
            tenant.and_then(|t| t.max_requests_per_sec),
            tenant.and_then(|t| t.requests_burst),
            proxy.max_requests_per_sec,
            proxy.requests_burst,
        );
        let (bytes, bytes_burst) = pair(
            tenant.and_then(|t| t.max_bytes_per_sec),
            tenant.and_then(|t| t.bytes_burst),
            proxy.max_bytes_per_sec,
            proxy.bytes_burst,
        );
        Self {
            max_connections: share(tenant.map_or(0, |t| t.max_connections)),
            max_requests_per_sec: requests,
            requests_burst,
            max_bytes_per_sec: bytes,
            bytes_burst,
            max_in_flight: share(
                tenant
                    .and_then(|t| t.max_in_flight)
                    .unwrap_or(proxy.max_in_flight),
            ),
        }
    }
}

/// A tenant as the proxy sees it.
#[derive(Debug)]
pub struct Tenant {
    /// Its configured name ([`OPEN_TENANT`] for the open one).
    pub name: Arc<str>,
    /// Its id in the XDP maps ([`tenant_id`] of the name; the open tenant
    /// is [`DEFAULT_TENANT`]).
    pub id: u32,
    /// Where its keys live.
    pub namespace: KeyNamespace,
    /// Its budgets.
    pub limits: TenantLimits,
}

/// Who an authenticated (or open) connection is.
#[derive(Debug)]
pub struct Identity {
    pub tenant: Arc<Tenant>,
    /// Only reads are allowed (the session refuses writes, deletes,
    /// arithmetic and flushes).
    pub read_only: bool,
    /// The username it authenticated as; `None` on the open tenant.
    pub username: Option<Arc<str>>,
    /// The stored hash of the credential it authenticated with: a reload
    /// keeps the session only while that very credential is configured.
    pub credential: Option<Arc<str>>,
}

impl Identity {
    /// A stable number for the credential it authenticated with (a hash
    /// of the stored hash's text), 0 on the open tenant: what the XDP
    /// side keeps beside a verified source, so revoking the credential
    /// revokes the source's status too, even after a restart.
    pub fn credential_id(&self) -> u32 {
        self.credential.as_deref().map_or(0, credential_id)
    }
}

/// See [`Identity::credential_id`]: never 0 for a credential.
pub fn credential_id(stored: &str) -> u32 {
    match crate::config::tenant_id(stored) {
        0 => 1,
        id => id,
    }
}

/// Why an authentication failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Unknown username or wrong password (not told apart on the wire).
    /// Unknown usernames are refused without hashing, so response time
    /// tells a known username from an unknown one: usernames are not
    /// secrets, and hashing for made-up names would hand a flood of them
    /// the CPU.
    #[error("authentication failure")]
    InvalidCredentials,
    /// Too many verifications in progress: retry shortly.
    #[error("authentication busy")]
    Busy,
}

struct Credential {
    hash: PasswordHash,
    text: Arc<str>,
    identity: Arc<Identity>,
}

/// Tenants and credentials of one configuration.
pub struct TenantRegistry {
    tenants: Vec<Arc<Tenant>>,
    open: Option<Arc<Identity>>,
    users: HashMap<Box<[u8]>, Vec<Credential>>,
    verifier: Arc<Verifier>,
    /// How the open tenant's keys are stored, as the process started:
    /// kept by every reload.
    key_mode: KeyMode,
}

impl std::fmt::Debug for TenantRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantRegistry")
            .field("tenants", &self.tenants)
            .field("open", &self.open.is_some())
            .field("users", &self.users.len())
            .field("key_mode", &self.key_mode)
            .finish()
    }
}

impl TenantRegistry {
    /// The open registry: one tenant, no authentication, keys in
    /// [`namespace::OPEN_NAMESPACE`], no budgets.
    pub fn open() -> Self {
        Self::open_with_keys(KeyMode::Namespaced)
    }

    /// The open registry with its keys stored as `keys` says, no budgets.
    pub fn open_with_keys(keys: KeyMode) -> Self {
        Self::open_for(&ProxyConfig {
            keys,
            ..ProxyConfig::default()
        })
    }

    /// The open registry of a proxy without tenants: its keys as
    /// `proxy.keys` says, its budgets `[proxy]`'s.
    pub fn open_for(proxy: &ProxyConfig) -> Self {
        let verifier = Arc::new(Verifier::new(AuthSettings::default()));
        let namespace = open_namespace(proxy.keys);
        Self::open_with(
            verifier,
            proxy.keys,
            namespace,
            TenantLimits::resolve(None, proxy),
        )
    }

    fn open_with(
        verifier: Arc<Verifier>,
        key_mode: KeyMode,
        namespace: KeyNamespace,
        limits: TenantLimits,
    ) -> Self {
        let tenant = Arc::new(Tenant {
            name: OPEN_TENANT.into(),
            id: DEFAULT_TENANT,
            namespace,
            limits,
        });
        Self {
            tenants: vec![tenant.clone()],
            open: Some(Arc::new(Identity {
                tenant,
                read_only: false,
                username: None,
                credential: None,
            })),
            users: HashMap::new(),
            verifier,
            key_mode,
        }
    }

    /// The registry of a validated configuration. Open when no tenant has
    /// credentials (tenants may exist for their XDP SYN budgets alone).
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        Self::build(config, None, AuthSettings::default())
    }

    /// Like [`Self::from_config`] with verifier settings of one's own.
    pub fn with_settings(config: &Config, settings: AuthSettings) -> anyhow::Result<Self> {
        Self::build(config, None, settings)
    }

    /// The registry of a new configuration, keeping what must survive a
    /// reload: flush generations of unchanged namespaces, remembered
    /// correct passwords (an entry only matches while its stored hash is
    /// still configured), and the open tenant's key mode. Remembered
    /// failures are forgotten.
    pub fn reload(&self, config: &Config) -> anyhow::Result<Self> {
        self.verifier.forget_failures();
        Self::build(config, Some(self), self.verifier.settings().clone())
    }

    fn build(
        config: &Config,
        previous: Option<&TenantRegistry>,
        settings: AuthSettings,
    ) -> anyhow::Result<Self> {
        let verifier = match previous {
            Some(p) => p.verifier.clone(),
            None => Arc::new(Verifier::new(settings)),
        };
        // Like every `[proxy]` setting but the tenants, the key mode applies
        // at restart: switching it at run time would orphan every key
        // stored so far, and move the open tenant between placements while
        // its clients are connected. So the open tenant keeps the mode the
        // process started with, even if it comes back after a reload that
        // had tenants.
        let key_mode = previous.map_or(config.proxy.keys, |p| p.key_mode);
        if config.tenants.iter().all(|t| t.credentials.is_empty()) {
            let limits = TenantLimits::resolve(None, &config.proxy);
            return Ok(match previous.and_then(|p| p.open.as_ref()) {
                // Keep the open tenant itself when nothing about it changed.
                Some(open) if open.tenant.limits == limits => Self {
                    tenants: vec![open.tenant.clone()],
                    open: Some(open.clone()),
                    users: HashMap::new(),
                    verifier,
                    key_mode,
                },
                // New budgets: the same key space (and flush generation).
                Some(open) => {
                    let namespace = open.tenant.namespace.clone();
                    Self::open_with(verifier, key_mode, namespace, limits)
                }
                None => Self::open_with(verifier, key_mode, open_namespace(key_mode), limits),
            });
        }
        let mut tenants = Vec::new();
        let mut users: HashMap<Box<[u8]>, Vec<Credential>> = HashMap::new();
        for t in &config.tenants {
            let ns = t.namespace();
            let namespace = previous
                .and_then(|p| {
                    p.tenants
                        .iter()
                        .find(|old| old.namespace.name() == ns.as_bytes())
                })
                .map_or_else(|| KeyNamespace::new(ns), |old| old.namespace.clone());
            let tenant = Arc::new(Tenant {
                name: t.name.as_str().into(),
                id: tenant_id(&t.name),
                namespace,
                limits: TenantLimits::resolve(Some(t), &config.proxy),
            });
            for c in &t.credentials {
                let hash = c.password_hash.clone();
                let stored = c.password_hash.to_string();
                users
                    .entry(c.username.as_bytes().into())
                    .or_default()
                    .push(Credential {
                        hash,
                        text: stored.as_str().into(),
                        identity: Arc::new(Identity {
                            tenant: tenant.clone(),
                            read_only: c.read_only,
                            username: Some(c.username.as_str().into()),
                            credential: Some(stored.as_str().into()),
                        }),
                    });
            }
            tenants.push(tenant);
        }
        Ok(Self {
            tenants,
            open: None,
            users,
            verifier,
            key_mode,
        })
    }

    /// How the open tenant's keys are stored: the mode this process
    /// started with (a reload never changes it).
    pub fn key_mode(&self) -> KeyMode {
        self.key_mode
    }

    /// Whether connections must authenticate.
    pub fn requires_auth(&self) -> bool {
        self.open.is_none()
    }

    /// The identity of every connection of an open registry.
    pub fn open_identity(&self) -> Option<Arc<Identity>> {
        self.open.clone()
    }

    /// What a session that started as `old` is under this registry: the
    /// same credential's identity (its read-only flag and namespace as now
    /// configured), or `None` when the credential is gone, or moved to
    /// another tenant, or the open tenant appeared or went away.
    pub fn refresh(&self, old: &Identity) -> Option<Arc<Identity>> {
        let Some(username) = &old.username else {
            return self.open.clone();
        };
        self.users
            .get(username.as_bytes())?
            .iter()
            .find(|c| Some(&c.text) == old.credential.as_ref())
            .map(|c| c.identity.clone())
            .filter(|id| id.tenant.name == old.tenant.name)
    }

    /// The tenants (the open one alone for an open registry).
    pub fn tenants(&self) -> &[Arc<Tenant>] {
        &self.tenants
    }

    /// The tenants a session can be: the open one, or those with
    /// credentials (a tenant without is only an XDP SYN budget and never
    /// touches a key).
    pub fn served_tenants(&self) -> Vec<Arc<Tenant>> {
        if let Some(open) = &self.open {
            return vec![open.tenant.clone()];
        }
        let served: std::collections::HashSet<&str> = self
            .users
            .values()
            .flatten()
            .map(|c| &*c.identity.tenant.name)
            .collect();
        self.tenants
            .iter()
            .filter(|t| served.contains(&*t.name))
            .cloned()
            .collect()
    }

    /// A tenant by name.
    pub fn tenant(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.tenants.iter().find(|t| &*t.name == name)
    }

    /// Verification counters (shared across reloads).
    pub fn auth_stats(&self) -> AuthStats {
        self.verifier.stats()
    }

    fn lookup(&self, username: &[u8]) -> Option<(&[Credential], Vec<Candidate<'_>>)> {
        let creds = self.users.get(username)?;
        let candidates = creds
            .iter()
            .map(|c| Candidate {
                hash: &c.hash,
                text: &c.text,
            })
            .collect();
        Some((creds, candidates))
    }

    /// Checks a username and password. May run PBKDF2 (tens of
    /// milliseconds) on the calling thread: call it from a blocking thread
    /// when [`Self::authenticate_cached`] returns `None`. An open registry
    /// accepts anything as its open identity.
    pub fn authenticate(
        &self,
        username: &[u8],
        password: &[u8],
    ) -> Result<Arc<Identity>, AuthError> {
        if let Some(open) = &self.open {
            return Ok(open.clone());
        }
        let Some((creds, candidates)) = self.lookup(username) else {
            self.verifier.count_failure();
            return Err(AuthError::InvalidCredentials);
        };
        let tag = self.verifier.tag(username, password);
        let i = self.verifier.verify(&tag, password, &candidates)?;
        Ok(creds[i].identity.clone())
    }

    /// Answers without hashing when it can: a remembered correct or wrong
    /// password, an unknown user, an open registry. `None`: call
    /// [`Self::authenticate`] (off the async threads).
    pub fn authenticate_cached(
        &self,
        username: &[u8],
        password: &[u8],
    ) -> Option<Result<Arc<Identity>, AuthError>> {
        if let Some(open) = &self.open {
            return Some(Ok(open.clone()));
        }
        let Some((creds, candidates)) = self.lookup(username) else {
            self.verifier.count_failure();
            return Some(Err(AuthError::InvalidCredentials));
        };
        let tag = self.verifier.tag(username, password);
        Some(
            self.verifier
                .verify_cached(&tag, &candidates)?
                .map(|i| creds[i].identity.clone()),
        )
    }
}

/// The open tenant's key space under `key_mode`.
fn open_namespace(key_mode: KeyMode) -> KeyNamespace {
    match key_mode {
        KeyMode::Namespaced => KeyNamespace::open(),
        KeyMode::Raw => KeyNamespace::raw(),
    }
}

/// The registry in force, swapped whole on reload. Sessions take an
/// `Arc` when they start (or per request) and keep using it; a swap never
/// blocks them for longer than a pointer copy.
#[derive(Debug)]
pub struct SharedRegistry {
    current: RwLock<Arc<TenantRegistry>>,
    /// Counts swaps: sessions and the generation sync notice a reload with
    /// one load, or wait for one.
    version: watch::Sender<u64>,
}

impl SharedRegistry {
    /// Starts with `registry`.
    pub fn new(registry: TenantRegistry) -> Self {
        Self {
            current: RwLock::new(Arc::new(registry)),
            version: watch::Sender::new(0),
        }
    }

    /// Changes whenever the registry is replaced.
    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// Wakes on every replacement.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The registry in force.
    pub fn load(&self) -> Arc<TenantRegistry> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces it; returns the old one.
    pub fn store(&self, registry: TenantRegistry) -> Arc<TenantRegistry> {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::replace(&mut *current, Arc::new(registry));
        // Bumped under the lock, after the swap: whoever sees the new
        // version loads the new registry.
        self.version.send_modify(|v| *v += 1);
        old
    }

    /// Builds the registry of `config` from the one in force (see
    /// [`TenantRegistry::reload`]) and swaps it in. On error the running
    /// registry stays.
    pub fn reload(&self, config: &Config) -> anyhow::Result<()> {
        let next = self.load().reload(config)?;
        self.store(next);
        Ok(())
    }
}

/// `guard tenant hash-password`: reads one password from `input` (a
/// trailing newline is not part of it) and returns its stored form.
pub fn hash_password_from(input: impl std::io::Read, iterations: u32) -> anyhow::Result<String> {
    use std::io::Read as _;
    if !(password::MIN_ITERATIONS..=password::MAX_ITERATIONS).contains(&iterations) {
        anyhow::bail!(
            "iterations must be {} to {}",
            password::MIN_ITERATIONS,
            password::MAX_ITERATIONS
        );
    }
    let mut buf = Vec::new();
    std::io::Read::take(input, 4096)
        .read_to_end(&mut buf)
        .context("cannot read the password from standard input")?;
    if buf.ends_with(b"\n") {
        buf.pop();
        if buf.ends_with(b"\r") {
            buf.pop();
        }
    }
    if buf.is_empty() {
        anyhow::bail!("empty password on standard input");
    }
    if buf.len() > auth::MAX_SASL_FIELD {
        anyhow::bail!(
            "password longer than {} bytes (SASL PLAIN's limit)",
            auth::MAX_SASL_FIELD
        );
    }
    let hash = PasswordHash::generate(&buf, iterations)
        .map_err(|e| anyhow::anyhow!("no randomness for the salt: {e}"))?;
    Ok(hash.to_string())
}

#[cfg(test)]
mod tests;
