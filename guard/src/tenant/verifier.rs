//! Password verification that stays cheap under a reconnect storm.
//!
//! PBKDF2 is slow on purpose, and a storm is thousands of clients
//! authenticating at once with the same few credentials. So:
//!
//! - A correct password is remembered: the cache key is
//!   HMAC-SHA256(process-random key, username ‖ password), never the
//!   password, and the entry names the stored hash it matched, so a rotated
//!   or removed credential stops matching at the next reload. A repeat
//!   costs one HMAC and a map lookup.
//! - Concurrent attempts with the same username and password share one
//!   PBKDF2 run (single flight): the first computes, the rest wait for its
//!   answer without taking a slot.
//! - At most [`AuthSettings::max_slow`] PBKDF2 runs go at once; past that
//!   an attempt is refused as [`AuthError::Busy`] at once, so wrong
//!   passwords cannot take more than that many cores.
//! - A wrong password is remembered for [`AuthSettings::failure_ttl`], so
//!   a client retrying it in a loop costs one HMAC per try.
//!
//! Map lookups by tag are not constant-time, which leaks nothing: tags are
//! keyed by a secret the client never sees.

use std::{
    collections::HashMap,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use super::{AUTH_DEADLINE, AuthError, password::PasswordHash};

/// Cache key: keyed HMAC of username and password.
pub(crate) type Tag = [u8; 32];

/// Knobs of the verifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSettings {
    /// Most PBKDF2 verifications running at once (0 refuses every
    /// uncached attempt).
    pub max_slow: usize,
    /// Correct passwords remembered (two generations of half this each:
    /// recently used entries survive a rotation).
    pub cache_capacity: usize,
    /// Wrong passwords remembered at most this many.
    pub failure_capacity: usize,
    /// How long a wrong password is answered from memory.
    pub failure_ttl: Duration,
    /// How long an attempt waits for an identical one already computing.
    pub wait_timeout: Duration,
}

impl Default for AuthSettings {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            // Leave cores for the proxy itself.
            max_slow: cores.div_ceil(2),
            cache_capacity: 8192,
            failure_capacity: 8192,
            failure_ttl: Duration::from_secs(5),
            wait_timeout: AUTH_DEADLINE,
        }
    }
}

/// Counters, for the status page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuthStats {
    /// Answered from the success cache.
    pub cache_hits: u64,
    /// Answered from the failure cache.
    pub failure_cache_hits: u64,
    /// PBKDF2 verifications run.
    pub slow_verifications: u64,
    /// Attempts that waited for an identical one.
    pub shared: u64,
    /// Attempts refused as busy.
    pub busy: u64,
    /// Attempts that failed (wrong password or unknown user).
    pub failures: u64,
}

#[derive(Default)]
struct Counters {
    cache_hits: AtomicU64,
    failure_cache_hits: AtomicU64,
    slow_verifications: AtomicU64,
    shared: AtomicU64,
    busy: AtomicU64,
    failures: AtomicU64,
}

/// The outcome of one verification, shared with waiters.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// Matched the stored hash with this text.
    Matched(Arc<str>),
    Failed,
    Busy,
}

#[derive(Default)]
struct Flight {
    outcome: Mutex<Option<Outcome>>,
    done: Condvar,
}

/// Two generations of correct-password tags: lookups promote from the old
/// one, and when the current one fills it becomes the old one. Bounded,
/// and what is in use survives.
#[derive(Default)]
struct SuccessCache {
    current: HashMap<Tag, Arc<str>>,
    old: HashMap<Tag, Arc<str>>,
}

impl SuccessCache {
    fn get(&mut self, tag: &Tag, half: usize) -> Option<Arc<str>> {
        if let Some(h) = self.current.get(tag) {
            return Some(h.clone());
        }
        let h = self.old.remove(tag)?;
        self.insert(*tag, h.clone(), half);
        Some(h)
    }

    fn insert(&mut self, tag: Tag, hash: Arc<str>, half: usize) {
        if self.current.len() >= half.max(1) && !self.current.contains_key(&tag) {
            self.old = std::mem::take(&mut self.current);
        }
        self.current.insert(tag, hash);
    }
}

/// One credential as the verifier sees it.
pub(crate) struct Candidate<'a> {
    pub hash: &'a PasswordHash,
    /// The stored text, which names the credential in the cache.
    pub text: &'a Arc<str>,
}

/// Shared by successive registries, so a reload keeps the cache warm.
pub(crate) struct Verifier {
    settings: AuthSettings,
    keyed: Hmac<Sha256>,
    success: Mutex<SuccessCache>,
    failures: Mutex<HashMap<Tag, Instant>>,
    inflight: Mutex<HashMap<Tag, Arc<Flight>>>,
    slow: AtomicUsize,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A slot for one PBKDF2 run; freed on drop.
pub(crate) struct SlowPermit<'a>(&'a AtomicUsize);

impl Drop for SlowPermit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The leader of a flight: publishes its outcome (Busy if it never got
/// to one, e.g. on a panic) and removes the flight.
struct Leader<'a> {
    verifier: &'a Verifier,
    tag: Tag,
    flight: Arc<Flight>,
    outcome: Option<Outcome>,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let outcome = self.outcome.take().unwrap_or(Outcome::Busy);
        *lock(&self.flight.outcome) = Some(outcome);
        self.flight.done.notify_all();
        lock(&self.verifier.inflight).remove(&self.tag);
    }
}

impl Verifier {
    pub(crate) fn new(settings: AuthSettings) -> Self {
        let mut key = [0u8; 32];
        if getrandom::fill(&mut key).is_err() {
            // No OS randomness: still unpredictable enough for a cache key
            // that never leaves the process.
            let seed = format!("{:?}{}", Instant::now(), std::process::id());
            key[..seed.len().min(32)].copy_from_slice(&seed.as_bytes()[..seed.len().min(32)]);
        }
        Self {
            settings,
            keyed: Hmac::<Sha256>::new_from_slice(&key).expect("any key length"),
            success: Mutex::default(),
            failures: Mutex::default(),
            inflight: Mutex::default(),
            slow: AtomicUsize::new(0),
            counters: Counters::default(),
        }
    }

    pub(crate) fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    pub(crate) fn tag(&self, username: &[u8], password: &[u8]) -> Tag {
        let mut mac = self.keyed.clone();
        mac.update(&(username.len() as u64).to_be_bytes());
        mac.update(username);
        mac.update(password);
        mac.finalize().into_bytes().into()
    }

    pub(crate) fn stats(&self) -> AuthStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AuthStats {
            cache_hits: get(&c.cache_hits),
            failure_cache_hits: get(&c.failure_cache_hits),
            slow_verifications: get(&c.slow_verifications),
            shared: get(&c.shared),
            busy: get(&c.busy),
            failures: get(&c.failures),
        }
    }

    /// Forgets wrong passwords (a reload may have made them right).
    pub(crate) fn forget_failures(&self) {
        lock(&self.failures).clear();
    }

    pub(crate) fn count_failure(&self) {
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn try_slot(&self) -> Option<SlowPermit<'_>> {
        let max = self.settings.max_slow;
        self.slow
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| SlowPermit(&self.slow))
    }

    fn cached_match(&self, tag: &Tag, candidates: &[Candidate<'_>]) -> Option<usize> {
        let text = lock(&self.success).get(tag, self.settings.cache_capacity / 2)?;
        candidates.iter().position(|c| *c.text == text)
    }

    fn cached_failure(&self, tag: &Tag, now: Instant) -> bool {
        let mut failures = lock(&self.failures);
        match failures.get(tag) {
            Some(&until) if now < until => true,
            Some(_) => {
                failures.remove(tag);
                false
            }
            None => false,
        }
    }

    /// Answers from memory only: `Some` for a remembered right or wrong
    /// password, `None` when PBKDF2 would be needed.
    pub(crate) fn verify_cached(
        &self,
        tag: &Tag,
        candidates: &[Candidate<'_>],
    ) -> Option<Result<usize, AuthError>> {
        if let Some(i) = self.cached_match(tag, candidates) {
            self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Some(Ok(i));
        }
        if self.cached_failure(tag, Instant::now()) {
            self.counters
                .failure_cache_hits
                .fetch_add(1, Ordering::Relaxed);
            self.count_failure();
            return Some(Err(AuthError::InvalidCredentials));
        }
        None
    }

    /// Which candidate `password` matches, computing PBKDF2 if it must
    /// (bounded, shared with identical concurrent attempts).
    pub(crate) fn verify(
        &self,
        tag: &Tag,
        password: &[u8],
        candidates: &[Candidate<'_>],
    ) -> Result<usize, AuthError> {
        if let Some(r) = self.verify_cached(tag, candidates) {
            return r;
        }
        let flight = {
            let mut inflight = lock(&self.inflight);
            match inflight.get(tag) {
                Some(f) => Err(f.clone()),
                None => {
                    // The previous leader fills the cache before it leaves
                    // this map: look again now that we hold the map.
                    if let Some(i) = self.cached_match(tag, candidates) {
                        self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(i);
                    }
                    let f = Arc::new(Flight::default());
                    inflight.insert(*tag, f.clone());
                    Ok(f)
                }
            }
        };
        let outcome = match flight {
            Err(other) => {
                self.counters.shared.fetch_add(1, Ordering::Relaxed);
                self.wait(&other)
            }
            Ok(flight) => {
                let mut leader = Leader {
                    verifier: self,
                    tag: *tag,
                    flight,
                    outcome: None,
                };
                let outcome = self.compute(tag, password, candidates);
                leader.outcome = Some(outcome.clone());
                drop(leader);
                outcome
            }
        };
        match outcome {
            Outcome::Matched(text) => candidates
                .iter()
                .position(|c| *c.text == text)
                .ok_or(AuthError::InvalidCredentials),
            Outcome::Failed => {
                self.count_failure();
                Err(AuthError::InvalidCredentials)
            }
            Outcome::Busy => {
                self.counters.busy.fetch_add(1, Ordering::Relaxed);
                Err(AuthError::Busy)
            }
        }
    }

    fn wait(&self, flight: &Flight) -> Outcome {
        let guard = lock(&flight.outcome);
        let (guard, _) = flight
            .done
            .wait_timeout_while(guard, self.settings.wait_timeout, |o| o.is_none())
            .unwrap_or_else(|e| e.into_inner());
        guard.clone().unwrap_or(Outcome::Busy)
    }

    fn compute(&self, tag: &Tag, password: &[u8], candidates: &[Candidate<'_>]) -> Outcome {
        let Some(_slot) = self.try_slot() else {
            return Outcome::Busy;
        };
        self.counters
            .slow_verifications
            .fetch_add(1, Ordering::Relaxed);
        // Every candidate is tried, so the time does not say which matched.
        let mut matched = None;
        for c in candidates {
            if c.hash.verify(password) && matched.is_none() {
                matched = Some(c.text.clone());
            }
        }
        match matched {
            Some(text) => {
                lock(&self.success).insert(*tag, text.clone(), self.settings.cache_capacity / 2);
                Outcome::Matched(text)
            }
            None => {
                let mut failures = lock(&self.failures);
                let now = Instant::now();
                if failures.len() >= self.settings.failure_capacity {
                    failures.retain(|_, until| *until > now);
                    if failures.len() >= self.settings.failure_capacity {
                        failures.clear();
                    }
                }
                failures.insert(*tag, now + self.settings.failure_ttl);
                Outcome::Failed
            }
        }
    }
}
