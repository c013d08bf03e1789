//! The batches waiting to be written on one backend connection: a queue
//! per tenant, served in deficit round robin, so a tenant within its
//! budget does not wait behind another tenant's burst.
//!
//! Each tenant's batches leave in the order they came (a session's
//! requests to one backend all use one connection, so memcached runs them
//! in the order the client sent them). Between tenants, each turn gives a
//! tenant [`QUANTUM`] bytes of credit; it sends batches while its credit
//! covers them, and its turn passes to the next tenant with batches
//! waiting. A tenant pushing a thousand batches and one pushing one get
//! the wire in turn, whoever came first.
//!
//! What this orders is only what has not been written yet: the connection
//! writes no more than a small window ahead of memcached's replies
//! (`backend::WINDOW`), so a burst waits here, where the round robin can
//! put another tenant's request before it, and not in memcached's socket,
//! where nothing can.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use tokio::sync::Notify;

/// Bytes of credit a tenant gets per turn: about sixteen small requests
/// (each weighs [`REQUEST_WEIGHT`] besides its bytes), or part of a
/// large one.
pub const QUANTUM: usize = 8 * 1024;

/// What one request weighs besides its bytes: the turn it takes at
/// memcached, which a small get costs as much as a small set.
pub const REQUEST_WEIGHT: usize = 512;

/// The tenant id guard's own requests (flush-generation markers) queue
/// under.
pub const INTERNAL: u32 = u32::MAX;

/// A tenant-fair queue with one consumer (the connection's task).
#[derive(Debug)]
pub struct FairQueue<T> {
    inner: Mutex<Lanes<T>>,
    /// Woken when something is pushed or the queue is closed.
    changed: Notify,
}

#[derive(Debug)]
struct Lanes<T> {
    lanes: HashMap<u32, Lane<T>>,
    /// Tenants with something queued, in turn order; the front's turn is
    /// on.
    turn: VecDeque<u32>,
    /// Pushes are taken (the connection is up).
    open: bool,
    /// The pool is gone: no more pushes, ever.
    closed: bool,
}

#[derive(Debug)]
struct Lane<T> {
    items: VecDeque<(T, usize)>,
    deficit: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Lanes {
                lanes: HashMap::new(),
                turn: VecDeque::new(),
                open: false,
                closed: false,
            }),
            changed: Notify::new(),
        }
    }
}

impl<T> FairQueue<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lanes<T>> {
        // Every update leaves the lanes whole, so a panicking holder
        // leaves nothing half done.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` for `tenant`, weighing `cost` bytes; gives it back
    /// when the queue takes nothing (its connection is down).
    pub fn push(&self, tenant: u32, item: T, cost: usize) -> Result<(), T> {
        let mut q = self.lock();
        if !q.open || q.closed {
            return Err(item);
        }
        let lane = q.lanes.entry(tenant).or_insert_with(|| Lane {
            items: VecDeque::new(),
            deficit: 0,
        });
        let first = lane.items.is_empty();
        lane.items.push_back((item, cost));
        if first {
            q.turn.push_back(tenant);
        }
        drop(q);
        self.changed.notify_one();
        Ok(())
    }

    /// The next item in deficit round robin order.
    pub fn pop(&self) -> Option<T> {
        let mut q = self.lock();
        loop {
            let tenant = *q.turn.front()?;
            let alone = q.turn.len() == 1;
            let lane = q
                .lanes
                .get_mut(&tenant)
                .expect("a tenant in turn has a lane");
            let cost = lane.items.front().expect("a lane in turn has items").1;
            if alone {
                // Nobody to take turns with.
                lane.deficit = lane.deficit.max(cost);
            }
            if lane.deficit >= cost {
                lane.deficit -= cost;
                let (item, _) = lane.items.pop_front().expect("checked above");
                if lane.items.is_empty() {
                    // Credit does not carry over an idle spell.
                    q.lanes.remove(&tenant);
                    q.turn.pop_front();
                }
                return Some(item);
            }
            lane.deficit += QUANTUM;
            q.turn.rotate_left(1);
        }
    }

    /// Whether anything is queued.
    pub fn is_empty(&self) -> bool {
        self.lock().turn.is_empty()
    }

    /// Starts (`true`) or stops taking pushes; stopping hands back what
    /// was queued, to be failed.
    pub fn set_open(&self, open: bool) -> Vec<T> {
        let mut q = self.lock();
        q.open = open;
        if open {
            return Vec::new();
        }
        q.turn.clear();
        q.lanes
            .drain()
            .flat_map(|(_, lane)| lane.items.into_iter().map(|(item, _)| item))
            .collect()
    }

    /// The pool is gone: takes no more pushes; what is queued may still
    /// be written.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_one();
    }

    /// Whether [`Self::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Waits for the next push or close (or returns at once if one
    /// happened since the last wait).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open<T>() -> FairQueue<T> {
        let q = FairQueue::default();
        q.set_open(true);
        q
    }

    fn drain(q: &FairQueue<(u32, u32)>) -> Vec<(u32, u32)> {
        std::iter::from_fn(|| q.pop()).collect()
    }

    #[test]
    fn one_tenant_keeps_its_order_whatever_the_sizes() {
        let q = open();
        for (i, cost) in [10, QUANTUM * 5, 1, QUANTUM + 1].into_iter().enumerate() {
            q.push(7, (7, i as u32), cost).unwrap();
        }
        assert_eq!(drain(&q), [(7, 0), (7, 1), (7, 2), (7, 3)]);
        assert!(q.is_empty());
    }

    /// A burst queued first does not keep a later, small tenant waiting:
    /// the small one is served within the burst's first turn.
    #[test]
    fn a_small_tenant_is_served_between_a_bursts_turns() {
        let q = open();
        for i in 0..1_000 {
            q.push(1, (1, i), 4 * 1024).unwrap();
        }
        q.push(2, (2, 0), 100).unwrap();
        let order = drain(&q);
        let b = order.iter().position(|&(t, _)| t == 2).unwrap();
        // One turn of the burst's credit at most: two 4 KiB batches.
        assert!(b <= QUANTUM / (4 * 1024), "served after {b} of the burst");
        // And the burst's own order holds.
        let burst: Vec<u32> = order.iter().filter(|e| e.0 == 1).map(|e| e.1).collect();
        assert!(burst.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(burst.len(), 1_000);
    }

    /// Two busy tenants share the bytes evenly, however their batches
    /// are cut.
    #[test]
    fn busy_tenants_get_equal_bytes() {
        let q = open();
        for i in 0..4_000 {
            q.push(1, (1, i), 1_000).unwrap();
        }
        for i in 0..400 {
            q.push(2, (2, i), 10_000).unwrap();
        }
        // Within one batch of even at every turn; over many, evenly.
        let mut bytes = [0usize; 3];
        let mut sent = 0;
        while sent < 2_000_000 {
            let (t, _) = q.pop().unwrap();
            let cost = if t == 1 { 1_000 } else { 10_000 };
            bytes[t as usize] += cost;
            sent += cost;
        }
        let (a, b) = (bytes[1] as f64, bytes[2] as f64);
        assert!((a / b - 1.0).abs() < 0.05, "{bytes:?}");
    }

    #[test]
    fn a_closed_or_down_queue_takes_nothing_and_gives_back_what_it_held() {
        let q: FairQueue<u32> = FairQueue::default();
        assert_eq!(q.push(1, 5, 1), Err(5), "not open yet");
        q.set_open(true);
        q.push(1, 6, 1).unwrap();
        q.push(2, 7, 1).unwrap();
        let mut back = q.set_open(false);
        back.sort();
        assert_eq!(back, [6, 7]);
        assert!(q.is_empty());
        assert_eq!(q.push(1, 8, 1), Err(8));
        q.set_open(true);
        q.push(1, 9, 1).unwrap();
        q.close();
        assert!(q.is_closed());
        assert_eq!(q.push(1, 10, 1), Err(10));
        // What was queued before the close still leaves.
        assert_eq!(q.pop(), Some(9));
    }
}
