//! The memcache proxy that runs behind the XDP guard.

pub mod ketama;
