//! Sockets opened inside namespaces.

use std::collections::BTreeMap;
use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::NsHandle;
use crate::sys;

/// A TCP listener on `addr` inside `ns`, with an explicit backlog (capped by
/// the namespace's `net.core.somaxconn`). `SO_REUSEADDR` is set.
pub fn listen_in(ns: &NsHandle, addr: SocketAddr, backlog: i32) -> Result<TcpListener> {
    ns.run_in(move || -> Result<TcpListener> {
        let fd = sys::socket(sys::family(&addr.ip()), libc::SOCK_STREAM, 0)?;
        let one: libc::c_int = 1;
        sys::setsockopt(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)?;
        if addr.is_ipv6() {
            sys::setsockopt(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &one)?;
        }
        let (ss, len) = sys::sockaddr(&addr);
        // SAFETY: ss/len describe a valid socket address.
        sys::cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&ss as *const libc::sockaddr_storage).cast(),
                len,
            )
        })
        .with_context(|| format!("bind {addr}"))?;
        // SAFETY: plain syscall on a socket we own.
        sys::cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })
            .with_context(|| format!("listen {addr}"))?;
        // SAFETY: fd is a listening TCP socket whose ownership moves into the TcpListener.
        Ok(unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) })
    })?
    .with_context(|| format!("listening on {addr} in netns {}", ns.name()))
}

/// How a connect of [`connect_from`] or [`connect_in`] failed:
/// `TimedOut` when nothing answered the SYN (dropped on the way, as XDP
/// does), `ConnectionRefused` when a reset did (nothing listens), `None`
/// when the failure was not the connect's own (e.g. entering the
/// namespace). A test counting drops must count only the first, since
/// a refusal is a failure too.
pub fn connect_error_kind(e: &anyhow::Error) -> Option<io::ErrorKind> {
    e.downcast_ref::<io::Error>().map(io::Error::kind)
}

/// Connects to `dst` from inside `ns`, bound to source address `src`.
pub fn connect_from(
    ns: &NsHandle,
    src: IpAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    connect_inner(ns, Some(src), dst, timeout)
}

/// Connects to `dst` from inside `ns`, letting the kernel pick the source.
pub fn connect_in(ns: &NsHandle, dst: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    connect_inner(ns, None, dst, timeout)
}

fn connect_inner(
    ns: &NsHandle,
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    ns.run_in(move || connect_here(src, dst, timeout))?
        .with_context(|| format!("connecting {src:?} -> {dst} in netns {}", ns.name()))
}

/// Non-blocking connect + poll, because std has no way to bind before a
/// timed connect.
fn connect_here(src: Option<IpAddr>, dst: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let fd: OwnedFd = sys::socket(
        sys::family(&dst.ip()),
        libc::SOCK_STREAM | libc::SOCK_NONBLOCK,
        0,
    )?;
    if let Some(src) = src {
        if src.is_ipv4() != dst.is_ipv4() {
            bail!("source {src} and destination {dst} differ in family");
        }
        let (ss, len) = sys::sockaddr(&SocketAddr::new(src, 0));
        // SAFETY: ss/len describe a valid socket address.
        sys::cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&ss as *const libc::sockaddr_storage).cast(),
                len,
            )
        })
        .with_context(|| format!("bind {src}"))?;
    }
    let (ss, len) = sys::sockaddr(&dst);
    // SAFETY: ss/len describe a valid socket address.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e.into());
        }
        if !sys::poll_one(&fd, libc::POLLOUT, timeout)? {
            // An io::Error, so callers can tell it from a refusal.
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            )
            .into());
        }
        let err: libc::c_int = sys::getsockopt(&fd, libc::SOL_SOCKET, libc::SO_ERROR, 0)?;
        if err != 0 {
            return Err(std::io::Error::from_raw_os_error(err).into());
        }
    }
    // SAFETY: fd is a connected TCP socket whose ownership moves into the TcpStream.
    let s = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    s.set_nonblocking(false)?;
    Ok(s)
}

/// `stats` on an open memcache connection: every `STAT name value` row up
/// to `END`. The stream's read timeout (if any) bounds the wait.
pub fn memcache_stats(s: &mut TcpStream) -> Result<BTreeMap<String, String>> {
    s.write_all(b"stats\r\n")?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut rows = BTreeMap::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).context("reading stats")? == 0 {
            bail!("connection closed during stats");
        }
        let line = line.trim_end();
        if line == "END" {
            return Ok(rows);
        }
        let Some((name, value)) = line.strip_prefix("STAT ").and_then(|l| l.split_once(' ')) else {
            bail!("unexpected stats line `{line}`");
        };
        rows.insert(name.to_owned(), value.to_owned());
    }
}

/// An echo server on `addr` inside `ns`, for two minutes at most: every
/// connection it accepts gets back what it sends. Proves connections work
/// end to end (while a flood is being dropped, or after a handshake XDP
/// answered).
pub fn echo_server(ns: &NsHandle, addr: SocketAddr) -> std::thread::JoinHandle<()> {
    let listener = listen_in(ns, addr, 4096).expect("listen");
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => break,
            }
        }
    })
}

/// Sends `ping i` on a connection to an [`echo_server`] and expects it back.
pub fn try_ping_pong(s: &mut TcpStream, i: u32) -> io::Result<()> {
    let msg = format!("ping {i}\n");
    s.write_all(msg.as_bytes())?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf)?;
    if buf != msg.as_bytes() {
        return Err(io::Error::other(format!(
            "echo of {msg:?} came back as {:?}",
            String::from_utf8_lossy(&buf)
        )));
    }
    Ok(())
}

/// [`try_ping_pong`], panicking on failure.
pub fn ping_pong(s: &mut TcpStream, i: u32) {
    try_ping_pong(s, i).expect("ping-pong on an established connection");
}
