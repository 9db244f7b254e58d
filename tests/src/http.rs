//! A plain HTTP GET from inside a test's network namespace (the daemon's `/metrics`,
//! Prometheus's API): HTTP/1.0, so that a reply is never chunked.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    time::Duration,
};

use anyhow::{Result, anyhow};

use crate::netns::{Netns, run_in_path};

/// GET `path` from 127.0.0.1:`port` in `ns` with this `Accept` header: the reply's head
/// and body.
pub fn get(ns: &Netns, port: u16, path: &str, accept: &str) -> Result<(String, String)> {
    get_at(&ns.path(), port, path, accept)
}

/// [`get`] in the namespace at `ns` (its path).
pub fn get_at(ns: &Path, port: u16, path: &str, accept: &str) -> Result<(String, String)> {
    let raw = run_in_path(ns, || -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: localhost\r\nAccept: {accept}\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("not an HTTP reply: {raw:.200}"))?;
    Ok((head.to_string(), body.to_string()))
}
