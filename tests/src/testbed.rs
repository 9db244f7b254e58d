//! The storm testbed shared by the end-to-end tests, the demo and the benchmarks: a
//! server namespace and a client namespace joined by one veth pair, the server at
//! 198.19.0.1 and 2001:db8::1, clients at the addresses asked for.

use std::net::{IpAddr, SocketAddr};

use anyhow::Result;

use crate::netns::{Netns, veth};

/// The server's veth (XDP attaches here).
pub const SERVER_DEV: &str = "s0";
pub const SERVER_V4: &str = "198.19.0.1";
pub const SERVER_V6: &str = "2001:db8::1";
/// The port the storms connect to.
pub const PORT: u16 = 8080;

pub struct Testbed {
    pub srv: Netns,
    pub cli: Netns,
}

impl Testbed {
    /// Build the namespaces; `clients` get addresses on the client veth.
    pub fn new(clients: &[IpAddr]) -> Result<Testbed> {
        let srv = Netns::new("srv")?;
        let cli = Netns::new("cli")?;
        veth(&srv, SERVER_DEV, &cli, "c0")?;
        srv.ip(&["addr", "add", &format!("{SERVER_V4}/15"), "dev", SERVER_DEV])?;
        srv.ip(&[
            "addr",
            "add",
            &format!("{SERVER_V6}/32"),
            "dev",
            SERVER_DEV,
            "nodad",
        ])?;
        for a in clients {
            match a {
                IpAddr::V4(_) => cli.ip(&["addr", "add", &format!("{a}/15"), "dev", "c0"])?,
                IpAddr::V6(_) => {
                    cli.ip(&["addr", "add", &format!("{a}/32"), "dev", "c0", "nodad"])?
                }
            }
        }
        Ok(Testbed { srv, cli })
    }

    /// The server's listening address for a client of `src`'s family.
    pub fn dst_for(src: IpAddr) -> SocketAddr {
        let ip = if src.is_ipv4() { SERVER_V4 } else { SERVER_V6 };
        SocketAddr::new(ip.parse().unwrap_or(src), PORT)
    }
}

/// Parse a literal address (test constants).
pub fn addr(s: &str) -> IpAddr {
    s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
}
