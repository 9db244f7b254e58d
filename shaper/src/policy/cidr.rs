//! Strict CIDR prefixes: no host bits set, no leading zeros, lengths in range.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// A network prefix with its host bits clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// Parse `a.b.c.d/len`, `x::/len`, or a bare address (a host prefix).
    pub fn parse(s: &str) -> Result<Prefix, String> {
        let (addr_s, len_s) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        // std's parser already rejects leading zeros in IPv4 octets ("010.0.0.1").
        let addr: IpAddr = addr_s.parse().map_err(|_| {
            if addr_s.split('.').any(|o| o.len() > 1 && o.starts_with('0')) {
                format!("invalid address `{addr_s}`: octets must not have leading zeros")
            } else {
                format!("invalid address `{addr_s}`: expected an IPv4 or IPv6 address")
            }
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len_s {
            None => max,
            Some(l) => {
                if l.is_empty()
                    || !l.bytes().all(|b| b.is_ascii_digit())
                    || (l.len() > 1 && l.starts_with('0'))
                {
                    return Err(format!("invalid prefix length `/{l}` in `{s}`"));
                }
                match l.parse::<u8>() {
                    Ok(n) if n <= max => n,
                    _ => return Err(format!("prefix length /{l} is out of range 0..={max}")),
                }
            }
        };
        let p = Prefix { addr, len };
        let net = p.network();
        if net != addr {
            return Err(format!(
                "`{s}` has host bits set; did you mean {}?",
                Prefix { addr: net, len }
            ));
        }
        Ok(p)
    }

    /// The address with the host bits cleared.
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(shaper_common::group_v4(
                a.octets(),
                self.len,
            ))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(shaper_common::group_v6(
                a.octets(),
                self.len,
            ))),
        }
    }

    /// The widest possible length for this family.
    pub fn max_len(&self) -> u8 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }

    /// Does this prefix cover `addr`?
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, addr) {
            (IpAddr::V4(_), IpAddr::V4(a)) => {
                shaper_common::group_v4(a.octets(), self.len)
                    == shaper_common::group_v4(self.v4(), self.len)
            }
            (IpAddr::V6(_), IpAddr::V6(a)) => {
                shaper_common::group_v6(a.octets(), self.len)
                    == shaper_common::group_v6(self.v6(), self.len)
            }
            _ => false,
        }
    }

    /// Does this prefix cover all of `other`?
    pub fn covers(&self, other: &Prefix) -> bool {
        self.len <= other.len && self.contains(other.addr)
    }

    fn v4(&self) -> [u8; 4] {
        match self.addr {
            IpAddr::V4(a) => a.octets(),
            IpAddr::V6(_) => [0; 4],
        }
    }

    fn v6(&self) -> [u8; 16] {
        match self.addr {
            IpAddr::V6(a) => a.octets(),
            IpAddr::V4(_) => [0; 16],
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl serde::Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
