//! The storm testbed shared by the end-to-end tests, the demo and the benchmarks: a
//! server namespace and client namespaces, the server at 198.19.0.1 and 2001:db8::1,
//! clients at the addresses asked for. One client namespace is joined to the server by
//! a veth pair; several are joined through a bridge in a namespace of its own (the
//! server's side stays one veth, where XDP attaches).

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
    /// The first client namespace.
    pub cli: Netns,
    /// More client namespaces (on the bridge).
    pub more: Vec<Netns>,
    /// The bridge's namespace, if there are several clients.
    pub switch: Option<Netns>,
}

impl Testbed {
    /// Build the namespaces; `clients` get addresses on the client veth.
    pub fn new(clients: &[IpAddr]) -> Result<Testbed> {
        let srv = Netns::new("srv")?;
        let cli = Netns::new("cli")?;
        veth(&srv, SERVER_DEV, &cli, "c0")?;
        server_addrs(&srv)?;
        client_addrs(&cli, clients)?;
        Ok(Testbed {
            srv,
            cli,
            more: Vec::new(),
            switch: None,
        })
    }

    /// One client namespace per address set, all on one bridge with the server.
    pub fn lan(sets: &[&[IpAddr]]) -> Result<Testbed> {
        let srv = Netns::new("srv")?;
        let sw = Netns::new("sw")?;
        sw.ip(&["link", "add", "br0", "type", "bridge"])?;
        sw.ip(&["link", "set", "br0", "up"])?;
        veth(&srv, SERVER_DEV, &sw, "p0")?;
        sw.ip(&["link", "set", "p0", "master", "br0"])?;
        server_addrs(&srv)?;
        let mut clis = Vec::new();
        for (i, set) in sets.iter().enumerate() {
            let cli = Netns::new(&format!("cli{i}"))?;
            let port = format!("p{}", i + 1);
            veth(&cli, "c0", &sw, &port)?;
            sw.ip(&["link", "set", &port, "master", "br0"])?;
            client_addrs(&cli, set)?;
            clis.push(cli);
        }
        let mut clis = clis.into_iter();
        let cli = clis
            .next()
            .ok_or_else(|| anyhow::anyhow!("a LAN needs at least one client set"))?;
        Ok(Testbed {
            srv,
            cli,
            more: clis.collect(),
            switch: Some(sw),
        })
    }

    /// Every client namespace, the first one first.
    pub fn clients(&self) -> Vec<&Netns> {
        std::iter::once(&self.cli).chain(self.more.iter()).collect()
    }

    /// The server veth's MAC address.
    /// Raw first SYNs from the client namespace to the server's port, `per_second` for
    /// `dur`, from random sources of `nets` in turn; returns how many were sent.
    pub fn flood(
        &self,
        nets: Vec<[u8; 3]>,
        per_second: u32,
        dur: std::time::Duration,
    ) -> Result<u64> {
        let f = crate::flood::Flood::start(
            &self.cli,
            "c0",
            crate::flood::FloodSpec {
                nets,
                dst: SERVER_V4.parse()?,
                dport: PORT,
                dst_mac: self.server_mac()?,
                per_second,
                max: dur,
            },
        )?;
        std::thread::sleep(dur);
        f.finish()
    }

    pub fn server_mac(&self) -> Result<[u8; 6]> {
        let out = std::process::Command::new("ip")
            .args([
                "-n",
                &self.srv.name,
                "-br",
                "link",
                "show",
                "dev",
                SERVER_DEV,
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mac = text
            .split_whitespace()
            .nth(2)
            .ok_or_else(|| anyhow::anyhow!("no MAC in `{text}`"))?;
        let mut b = [0u8; 6];
        for (i, part) in mac.split(':').enumerate() {
            if let Some(slot) = b.get_mut(i) {
                *slot = u8::from_str_radix(part, 16)?;
            }
        }
        Ok(b)
    }

    /// The server's listening address for a client of `src`'s family.
    pub fn dst_for(src: IpAddr) -> SocketAddr {
        let ip = if src.is_ipv4() { SERVER_V4 } else { SERVER_V6 };
        SocketAddr::new(ip.parse().unwrap_or(src), PORT)
    }
}

fn server_addrs(srv: &Netns) -> Result<()> {
    srv.ip(&["addr", "add", &format!("{SERVER_V4}/15"), "dev", SERVER_DEV])?;
    srv.ip(&[
        "addr",
        "add",
        &format!("{SERVER_V6}/32"),
        "dev",
        SERVER_DEV,
        "nodad",
    ])
}

fn client_addrs(cli: &Netns, addrs: &[IpAddr]) -> Result<()> {
    for a in addrs {
        match a {
            IpAddr::V4(_) => cli.ip(&["addr", "add", &format!("{a}/15"), "dev", "c0"])?,
            IpAddr::V6(_) => cli.ip(&["addr", "add", &format!("{a}/32"), "dev", "c0", "nodad"])?,
        }
    }
    Ok(())
}

/// Parse a literal address (test constants).
pub fn addr(s: &str) -> IpAddr {
    s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
}
