//! Telling systemd how the daemon is doing (`Type=notify`): ready, reloading, stopping,
//! and a one-line status that `systemctl status` shows.

/// Tell systemd (Type=notify) when NOTIFY_SOCKET is set.
pub fn notify(msg: &str) {
    use std::os::linux::net::SocketAddrExt as _;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(&path),
    };
    if let Ok(addr) = addr
        && let Err(e) = sock.send_to_addr(msg.as_bytes(), &addr)
    {
        tracing::warn!(error = %e, "notifying systemd");
    }
}
