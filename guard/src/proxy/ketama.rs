//! Ketama consistent hashing, compatible with twemproxy (nutcracker 0.5.0)
//! configured with `distribution: ketama` and `hash: md5`.
//!
//! Given the same servers (identity string and weight), the same set of
//! live servers and the same key, [`Ketama`] picks the same server as
//! twemproxy does. The order of the list does not matter to the mapping.
//! Verified against the real nutcracker 0.5.0 by `tests/twemproxy.rs`.
//!
//! How twemproxy builds its continuum (`ketama_update` in `nc_ketama.c`):
//!
//! * Only live servers take part. `nlive` is their count and `total` the
//!   sum of their weights.
//! * A server of weight `w` gets
//!   `floorf(w / total * 160 / 4 * nlive + 1e-10) * 4` points, evaluated
//!   in `f32` exactly as the C expression is (see `points_for`).
//! * For each `n` in `0..points / 4` the string `"<identity>-<n>"` is hashed
//!   with MD5 and the 16-byte digest yields four points, one per
//!   little-endian `u32` word.
//! * The points are sorted by value. A key hash is dispatched to the first
//!   point whose value is `>=` the hash, wrapping to the first point past the
//!   end.
//!
//! A key is hashed with [`md5_hash`] (first four digest bytes, little
//! endian), except that twemproxy maps an empty key to hash 0.
//!
//! Limits of the compatibility, all outside what a valid twemproxy config
//! can express or where twemproxy itself is undefined:
//!
//! * twemproxy rejects weight 0; here a weight-0 server is treated as not
//!   live.
//! * If `"<identity>-<n>"` is longer than 85 bytes twemproxy hashes past the
//!   end of its stack buffer; identities that long have no defined mapping
//!   to match.
//! * Weight sums above `u32::MAX` overflow in twemproxy.
//! * twemproxy rejects duplicate identities; here they are allowed and the
//!   lower index wins ties between their (identical) points.
//!
//! When two servers put a point on the same value, twemproxy's choice
//! follows from two sorts: loading the config sorts servers by identity
//! (shorter first, then bytewise), and glibc's `qsort` of the continuum is
//! stable. So the identity that sorts first owns the shared value,
//! whatever the config order; this module does the same.

use std::sync::Arc;

use md5::{Digest, Md5};

/// Points one server of average weight gets on the continuum.
pub const POINTS_PER_SERVER: u32 = 160;

/// Points derived from one MD5 digest.
const POINTS_PER_HASH: u32 = 4;

/// Port that twemproxy leaves out of a server's identity (libmemcached
/// compatibility); see [`server_identity`].
pub const DEFAULT_KETAMA_PORT: u16 = 11211;

/// twemproxy's `hash: md5`: the first four bytes of the key's MD5 digest,
/// little endian.
pub fn md5_hash(key: &[u8]) -> u32 {
    let digest = Md5::digest(key);
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// The identity twemproxy hashes for a `servers:` entry
/// `host:port:weight [name]`: `name` when given, otherwise `host:port`, or
/// just `host` when the port is 11211.
pub fn server_identity(host: &str, port: u16, name: Option<&str>) -> String {
    match name {
        Some(name) => name.to_owned(),
        None if port == DEFAULT_KETAMA_PORT => host.to_owned(),
        None => format!("{host}:{port}"),
    }
}

/// Number of continuum points twemproxy gives a live server of `weight` when
/// the live servers number `nlive` and weigh `total_weight` together.
///
/// This must reproduce the C arithmetic bit for bit: `pct` and the product
/// are `float`, the `1e-10` literal promotes the sum to `double`, and
/// `floorf` narrows it back. Exact or `f64` arithmetic gives 4 more points
/// whenever the `f32` product lands just below an integer, e.g. weights
/// 1, 2, 3, 4, 15 over five servers.
fn points_for(weight: u32, total_weight: u32, nlive: u32) -> u32 {
    let pct = weight as f32 / total_weight as f32;
    let scaled = pct * POINTS_PER_SERVER as f32 / POINTS_PER_HASH as f32 * nlive as f32;
    let floored = ((f64::from(scaled) + 0.000_000_000_1) as f32).floor();
    (floored * POINTS_PER_HASH as f32) as u32
}

/// twemproxy's `string_compare`: shorter first, then bytewise.
fn identity_cmp(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Point {
    value: u32,
    server: u32,
}

/// An immutable ketama continuum over a list of servers.
///
/// Cloning is cheap (the points are shared). To reflect a change in the
/// server list or in liveness, build a new one; that is what twemproxy does
/// too.
#[derive(Clone, Debug, Default)]
pub struct Ketama {
    points: Arc<[Point]>,
    servers: usize,
    live: usize,
}

impl Ketama {
    /// Builds the continuum with every server live.
    ///
    /// `servers` holds `(identity, weight)`, identity as returned by
    /// [`server_identity`]. Indices returned by
    /// [`server_for`](Self::server_for) refer to this slice.
    pub fn new<S: AsRef<[u8]>>(servers: &[(S, u32)]) -> Self {
        Self::with_live(servers, |_| true)
    }

    /// Builds the continuum from the servers for which `is_live(index)`
    /// holds, as twemproxy does with `auto_eject_hosts: true` while some
    /// servers are ejected.
    ///
    /// Ejected servers get no points, and the point counts of the others
    /// are recomputed over the live servers only, so keys of live servers
    /// mostly stay put and keys of ejected ones spread over the rest.
    /// Indices still refer to the full `servers` slice.
    pub fn with_live<S, F>(servers: &[(S, u32)], mut is_live: F) -> Self
    where
        S: AsRef<[u8]>,
        F: FnMut(usize) -> bool,
    {
        let live: Vec<bool> = servers
            .iter()
            .enumerate()
            .map(|(i, (_, weight))| *weight > 0 && is_live(i))
            .collect();
        let nlive = live.iter().filter(|&&l| l).count();
        let total_weight: u64 = servers
            .iter()
            .zip(&live)
            .filter(|&(_, &l)| l)
            .map(|((_, w), _)| u64::from(*w))
            .sum();
        let total_weight = u32::try_from(total_weight).unwrap_or(u32::MAX);

        // twemproxy sorts its server array by identity when it loads the
        // config, and the stable sort below keeps that order among equal
        // point values, so it decides which server wins a tie.
        let mut order: Vec<usize> = (0..servers.len()).filter(|&i| live[i]).collect();
        order.sort_by(|&x, &y| identity_cmp(servers[x].0.as_ref(), servers[y].0.as_ref()));

        let mut points = Vec::with_capacity(nlive * POINTS_PER_SERVER as usize);
        let mut name = Vec::new();
        for index in order {
            let (identity, weight) = &servers[index];
            let count = points_for(*weight, total_weight, nlive as u32);
            let server = u32::try_from(index).expect("more than u32::MAX servers");
            for n in 0..count / POINTS_PER_HASH {
                name.clear();
                name.extend_from_slice(identity.as_ref());
                name.push(b'-');
                name.extend_from_slice(n.to_string().as_bytes());
                let digest = Md5::digest(&name);
                for word in digest.chunks_exact(4) {
                    let value = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
                    points.push(Point { value, server });
                }
            }
        }
        // glibc's qsort is a merge sort, hence stable.
        points.sort_by_key(|p| p.value);

        Ketama {
            points: points.into(),
            servers: servers.len(),
            live: nlive,
        }
    }

    /// Index of the server that owns `key`, or `None` when no server is
    /// live.
    pub fn server_for(&self, key: &[u8]) -> Option<usize> {
        // twemproxy skips hashing for an empty key and uses 0.
        let hash = if key.is_empty() { 0 } else { md5_hash(key) };
        self.server_for_hash(hash)
    }

    /// Index of the server that owns a precomputed key hash, for callers
    /// that hash only part of the key (twemproxy's `hash_tag`).
    pub fn server_for_hash(&self, hash: u32) -> Option<usize> {
        let i = self.points.partition_point(|p| p.value < hash);
        let point = self.points.get(i).or_else(|| self.points.first())?;
        Some(point.server as usize)
    }

    /// Number of servers the continuum was built from, live or not.
    pub fn server_count(&self) -> usize {
        self.servers
    }

    /// Number of servers that own points.
    pub fn live_count(&self) -> usize {
        self.live
    }

    /// Number of points on the continuum.
    pub fn point_count(&self) -> usize {
        self.points.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(names: &[&str], weights: &[u32]) -> Vec<(String, u32)> {
        names
            .iter()
            .zip(weights)
            .map(|(n, w)| (n.to_string(), *w))
            .collect()
    }

    fn three() -> Vec<(String, u32)> {
        servers(
            &["10.0.0.1:11212", "10.0.0.2:11212", "10.0.0.3:11212"],
            &[1, 1, 1],
        )
    }

    fn points_of(k: &Ketama, server: usize) -> usize {
        k.points
            .iter()
            .filter(|p| p.server as usize == server)
            .count()
    }

    #[test]
    fn md5_hash_takes_first_four_bytes_little_endian() {
        // md5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(md5_hash(b""), 0xd98c_1dd4);
        // md5("a") = 0cc175b9c0f1b6a831c399e269772661
        assert_eq!(md5_hash(b"a"), 0xb975_c10c);
    }

    #[test]
    fn identity_follows_twemproxy_naming() {
        assert_eq!(server_identity("10.0.0.1", 11212, None), "10.0.0.1:11212");
        assert_eq!(server_identity("10.0.0.1", 11211, None), "10.0.0.1");
        assert_eq!(server_identity("10.0.0.1", 11211, Some("a")), "a");
    }

    #[test]
    fn empty_list_has_no_server() {
        let k = Ketama::new::<String>(&[]);
        assert_eq!(k.server_for(b"key"), None);
        assert_eq!(k.server_for(b""), None);
        assert_eq!(k.point_count(), 0);
        assert_eq!(Ketama::default().server_for(b"key"), None);
    }

    #[test]
    fn all_ejected_has_no_server() {
        let k = Ketama::with_live(&three(), |_| false);
        assert_eq!(k.server_for(b"key"), None);
        assert_eq!((k.server_count(), k.live_count()), (3, 0));
    }

    #[test]
    fn one_server_owns_everything() {
        let k = Ketama::new(&servers(&["only"], &[7]));
        assert_eq!(k.point_count(), 160);
        for i in 0..1000 {
            assert_eq!(k.server_for(format!("key{i}").as_bytes()), Some(0));
        }
    }

    #[test]
    fn equal_weights_get_160_points_each() {
        let k = Ketama::new(&three());
        assert_eq!(k.point_count(), 480);
        for s in 0..3 {
            assert_eq!(points_of(&k, s), 160);
        }
    }

    #[test]
    fn weighted_point_counts_follow_f32_arithmetic() {
        assert_eq!(points_for(1, 6, 3), 80);
        assert_eq!(points_for(2, 6, 3), 160);
        assert_eq!(points_for(3, 6, 3), 240);
        let k = Ketama::new(&servers(&["a", "b", "c"], &[1, 2, 3]));
        assert_eq!(
            [points_of(&k, 0), points_of(&k, 1), points_of(&k, 2)],
            [80, 160, 240]
        );
        // 1/25 * 40 * 5 is 7.9999995 in f32, so twemproxy gives weight 1
        // of 25 over five servers 28 points where exact arithmetic gives 32.
        let weights = [1, 2, 3, 4, 15];
        let counts: Vec<u32> = weights.iter().map(|&w| points_for(w, 25, 5)).collect();
        assert_eq!(counts, [28, 60, 92, 124, 480]);
    }

    #[test]
    fn weight_zero_is_not_live() {
        let k = Ketama::new(&servers(&["a", "b"], &[0, 1]));
        assert_eq!(k.live_count(), 1);
        assert_eq!(points_of(&k, 0), 0);
        assert_eq!(points_of(&k, 1), 160);
    }

    #[test]
    fn points_are_sorted() {
        let k = Ketama::new(&three());
        assert!(k.points.windows(2).all(|w| w[0].value <= w[1].value));
    }

    #[test]
    fn dispatch_picks_first_point_at_or_above_and_wraps() {
        let k = Ketama::new(&three());
        let first = k.points[0];
        let last = k.points[k.points.len() - 1];
        let mid = k.points[100];
        assert_eq!(k.server_for_hash(0), Some(first.server as usize));
        assert_eq!(k.server_for_hash(first.value), Some(first.server as usize));
        assert_eq!(k.server_for_hash(mid.value), Some(mid.server as usize));
        let next = k.points[101];
        assert_eq!(k.server_for_hash(mid.value + 1), Some(next.server as usize));
        assert_eq!(k.server_for_hash(last.value), Some(last.server as usize));
        // Past the last point the ring wraps to the first.
        assert!(last.value < u32::MAX);
        assert_eq!(
            k.server_for_hash(last.value + 1),
            Some(first.server as usize)
        );
        assert_eq!(k.server_for_hash(u32::MAX), Some(first.server as usize));
    }

    #[test]
    fn empty_key_uses_hash_zero() {
        let k = Ketama::new(&three());
        assert_eq!(k.server_for(b""), k.server_for_hash(0));
    }

    #[test]
    fn equal_values_go_to_identity_sorting_first() {
        // "t307-n" and "t570-m" share the point value 0xe0c1e7ab.
        let tie = 0xe0c1_e7ab;
        let k = Ketama::new(&servers(&["t570", "t307"], &[1, 1]));
        assert_eq!(k.server_for_hash(tie), Some(1));
        let k = Ketama::new(&servers(&["t307", "t570"], &[1, 1]));
        assert_eq!(k.server_for_hash(tie), Some(0));
        let values = |k: &Ketama| k.points.iter().filter(|p| p.value == tie).count();
        assert_eq!(values(&k), 2);
    }

    #[test]
    fn identities_sort_shorter_first() {
        use std::cmp::Ordering::*;
        assert_eq!(identity_cmp(b"z1", b"a10"), Less);
        assert_eq!(identity_cmp(b"a10", b"b10"), Less);
        assert_eq!(identity_cmp(b"b10", b"b10"), Equal);
    }

    #[test]
    fn duplicate_identities_resolve_to_lower_index() {
        let k = Ketama::new(&servers(&["same", "same"], &[1, 1]));
        for i in 0..1000 {
            assert_eq!(k.server_for(format!("key{i}").as_bytes()), Some(0));
        }
    }

    #[test]
    fn three_servers_share_keys_roughly_evenly() {
        let k = Ketama::new(&three());
        let mut counts = [0usize; 3];
        for i in 0..10_000 {
            counts[k.server_for(format!("key:{i}").as_bytes()).unwrap()] += 1;
        }
        for c in counts {
            assert!((2_500..=4_200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn ejection_moves_only_the_ejected_servers_keys() {
        let list = three();
        let all = Ketama::new(&list);
        let without_1 = Ketama::with_live(&list, |i| i != 1);
        assert_eq!(without_1.live_count(), 2);
        assert_eq!(points_of(&without_1, 1), 0);
        // Two live servers of equal weight get 160 points each again.
        assert_eq!(without_1.point_count(), 320);
        for i in 0..5_000 {
            let key = format!("key:{i}");
            let before = all.server_for(key.as_bytes()).unwrap();
            let after = without_1.server_for(key.as_bytes()).unwrap();
            assert_ne!(after, 1);
            if before != 1 {
                assert_eq!(before, after, "{key}");
            }
        }
    }

    #[test]
    fn clone_shares_points() {
        let k = Ketama::new(&three());
        let c = k.clone();
        assert!(Arc::ptr_eq(&k.points, &c.points));
    }
}
