//! What SYN cookies answered from XDP need of the kernel: its listener
//! accepts the ACK of a cookie it did not send only if it sent a cookie
//! itself within the last two minutes, which with
//! `net.ipv4.tcp_syncookies = 2` it does for every SYN it receives (the
//! program lets one SYN per protected listener a second through to it).
//! `guard run` checks the setting of the network namespace it runs in,
//! at start and on every reload, and says what it found. It never changes
//! it: the setting governs every listener of the namespace, not only the
//! protected ones.

use log::Level;

use crate::config::SynCookies;

/// The setting, in the namespace of the reading thread.
pub const SYSCTL_PATH: &str = "/proc/sys/net/ipv4/tcp_syncookies";
/// The value XDP's cookies need.
pub const NEEDED: u8 = 2;

/// `net.ipv4.tcp_syncookies` of this process's network namespace.
pub fn kernel_syncookies() -> Result<u8, String> {
    let text = std::fs::read_to_string(SYSCTL_PATH).map_err(|e| format!("{SYSCTL_PATH}: {e}"))?;
    text.trim()
        .parse()
        .map_err(|_| format!("{SYSCTL_PATH} holds `{}`", text.trim()))
}

/// What to log about the kernel's setting under `mode`; nothing when
/// cookies are off.
pub fn advice(mode: SynCookies, found: Result<u8, String>) -> Option<(Level, String)> {
    let which = match mode {
        SynCookies::Off => return None,
        SynCookies::Auto => {
            "SYNs of sources with no tenant that the shared or the host's SYN budget refuses"
        }
        SynCookies::On => "every SYN of a source with no tenant",
    };
    Some(match found {
        Ok(NEEDED) => (
            Level::Info,
            format!(
                "SYN cookies {mode}: XDP answers {which} with a cookie; \
                 net.ipv4.tcp_syncookies = {NEEDED} here, as they need, and one SYN per \
                 protected listener a second goes to the kernel so that it keeps accepting them"
            ),
        ),
        Ok(v) => (
            Level::Warn,
            format!(
                "SYN cookies {mode}: XDP answers {which} with a cookie, but \
                 net.ipv4.tcp_syncookies = {v} in this network namespace and the kernel accepts \
                 the ACKs that answer them only with {NEEDED}: those clients are reset instead of \
                 connected. Run `sysctl -w net.ipv4.tcp_syncookies={NEEDED}` (the kernel then \
                 answers every SYN that reaches it with a cookie too), or --syn-cookies off"
            ),
        ),
        Err(e) => (
            Level::Warn,
            format!(
                "SYN cookies {mode}: cannot read net.ipv4.tcp_syncookies ({e}); XDP's cookies \
                 need it to be {NEEDED}, or their clients are reset instead of connected"
            ),
        ),
    })
}

/// Logs [`advice`] for `mode` about this namespace's setting.
pub fn check_kernel(mode: SynCookies) {
    if let Some((level, line)) = advice(mode, kernel_syncookies()) {
        log::log!(level, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_says_what_is_needed_and_what_was_found() {
        assert_eq!(advice(SynCookies::Off, Ok(0)), None);
        let (level, line) = advice(SynCookies::Auto, Ok(2)).unwrap();
        assert_eq!(level, Level::Info);
        assert!(line.contains("tcp_syncookies = 2 here"), "{line}");
        for found in [0, 1] {
            let (level, line) = advice(SynCookies::On, Ok(found)).unwrap();
            assert_eq!(level, Level::Warn);
            assert!(
                line.contains(&format!(
                    "tcp_syncookies = {found} in this network namespace"
                )),
                "{line}"
            );
            assert!(
                line.contains("sysctl -w net.ipv4.tcp_syncookies=2"),
                "{line}"
            );
            assert!(line.contains("--syn-cookies off"), "{line}");
            assert!(
                line.contains("every SYN of a source with no tenant"),
                "{line}"
            );
        }
        let (level, line) = advice(SynCookies::Auto, Err("gone".into())).unwrap();
        assert_eq!(level, Level::Warn);
        assert!(
            line.contains("cannot read") && line.contains("gone"),
            "{line}"
        );
    }

    #[test]
    fn the_setting_of_this_namespace_reads() {
        // Every Linux kernel built with syncookies has the file.
        let v = kernel_syncookies().expect("tcp_syncookies readable");
        assert!(v <= 2, "{v}");
    }
}
