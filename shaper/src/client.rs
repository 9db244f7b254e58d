//! The control socket's client end (the CLI and the tests): one request, one reply.

use std::{os::unix::net::UnixStream, path::Path, time::Duration};

use anyhow::{Context as _, Result, anyhow};

use crate::protocol::{Envelope, PROTOCOL, Request, Response, read_frame, write_frame};

/// Send one request and read one response (blocking; for the CLI and tests).
pub fn call(socket: &Path, request: Request) -> Result<Response> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                "is the daemon running? start it with `shaper run --iface IF` (or `systemctl \
                 start shaper`)"
            }
            std::io::ErrorKind::PermissionDenied => "the control socket is root's: run as root",
            _ => "",
        };
        anyhow!(
            "cannot reach the daemon at {}: {e}; {hint}",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = serde_json::to_vec(&Envelope {
        version: PROTOCOL,
        body: request,
    })?;
    // A daemon that refuses the request (a non-root peer) replies and closes at once,
    // and the write may then fail: its reply is still there to read.
    let wrote = write_frame(&mut s, &body);
    let reply = match (wrote, read_frame(&mut s)) {
        (_, Ok(reply)) => reply,
        (Err(e), Err(_)) => return Err(e.context("sending the request to the daemon")),
        (Ok(()), Err(e)) => return Err(e.context("reading the daemon's reply")),
    };
    serde_json::from_slice(&reply).context("the daemon's reply is not a response")
}
