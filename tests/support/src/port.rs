//! Ports for servers a test starts.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, TcpListener},
    sync::Mutex,
};

/// A TCP port on 127.0.0.1 that nothing listened on a moment ago, never
/// the same one twice in this process: the kernel readily hands a port
/// just released out again, and tests run in parallel, so without the
/// record two servers of one test run could be given the same port.
///
/// Another process may still take the port before the caller binds it.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    // A test that panicked while holding the lock left the set intact.
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    for _ in 0..10_000 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("binding 127.0.0.1:0: {e}"))
            .port();
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!(
        "no port left that this process has not handed out ({} so far)",
        handed_out.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_hands_a_port_out_twice() {
        let mut seen = HashSet::new();
        for _ in 0..2_000 {
            assert!(seen.insert(free_port()));
        }
    }
}
