//! Test pieces shared by `guard`'s integration tests and the privileged
//! `guard-tests` harness. It depends on neither (`guard`'s tests could not
//! use a crate that depends on `guard`), and knows nothing of network
//! namespaces: callers that start things inside one hand in the
//! [`Command`](std::process::Command) and the probe to use.
//!
//! - [`process`]: [`ChildGuard`], a child process stopped and reaped on
//!   drop, panics included, and waits for it to start accepting.
//! - [`memcached`]: [`Memcached`], a real memcached killed on drop.
//! - [`nutcracker`]: [`Nutcracker`], a real twemproxy (ketama, md5) in
//!   front of given servers, stopped on drop.
//! - [`port`]: [`free_port`], never the same port twice in one process.
//! - [`peer`]: [`peer_state`], whether the other end closed a connection
//!   within a deadline, told apart from its staying open or answering.
//! - [`relay`]: [`DelayRelay`], a TCP relay that holds replies back by a
//!   delay switchable live: a slow network in front of a real server.

pub mod memcached;
pub mod nutcracker;
pub mod peer;
pub mod port;
pub mod process;
pub mod relay;

pub use memcached::{MEMCACHED_BIN, Memcached};
pub use nutcracker::{NUTCRACKER_BIN, Nutcracker};
pub use peer::{PeerState, is_reset, peer_state};
pub use port::free_port;
pub use process::{ChildGuard, accepts};
pub use relay::DelayRelay;
