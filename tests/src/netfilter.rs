//! What operators run today to limit new connections per subnet, set up in a test
//! namespace with the same quota as a shaper rule: nftables (a meter per /24 and per
//! /64 at the netdev ingress hook) and iptables (hashlimit per /24, ip6tables per /64,
//! in the raw table's PREROUTING). Used by the flood benchmark and the side-by-side
//! storms.

use anyhow::Result;

use crate::netns::Netns;

/// Which of the two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limiter {
    Nftables,
    Iptables,
}

impl Limiter {
    pub fn name(self) -> &'static str {
        match self {
            Limiter::Nftables => "nftables meter (netdev ingress)",
            Limiter::Iptables => "iptables hashlimit (raw)",
        }
    }

    /// Limit first SYNs arriving on `dev` to `rate` per second with a burst of `burst`,
    /// per /24 (IPv4) and per /64 (IPv6); over it, drop.
    pub fn install(self, ns: &Netns, dev: &str, rate: u32, burst: u32) -> Result<()> {
        match self {
            Limiter::Nftables => {
                let limit = format!("limit rate over {rate}/second burst {burst} packets");
                let rules = format!(
                    "table netdev {TABLE} {{\n\
                     \x20   chain ingress {{\n\
                     \x20       type filter hook ingress device \"{dev}\" priority 0; policy accept;\n\
                     \x20       tcp flags & (syn | ack) == syn meter syn4 {{ ip saddr & 255.255.255.0 {limit} }} counter drop\n\
                     \x20       tcp flags & (syn | ack) == syn meter syn6 {{ ip6 saddr & ffff:ffff:ffff:ffff:: {limit} }} counter drop\n\
                     \x20   }}\n\
                     }}\n"
                );
                ns.exec_stdin(&["nft", "-f", "-"], &rules)
            }
            Limiter::Iptables => {
                let (rate, burst) = (format!("{rate}/sec"), burst.to_string());
                for (cmd, mask) in IPT {
                    ns.exec(&[
                        cmd,
                        "-t",
                        "raw",
                        "-A",
                        "PREROUTING",
                        "-i",
                        dev,
                        "-p",
                        "tcp",
                        "--syn",
                        "-m",
                        "hashlimit",
                        "--hashlimit-above",
                        &rate,
                        "--hashlimit-burst",
                        &burst,
                        "--hashlimit-mode",
                        "srcip",
                        "--hashlimit-srcmask",
                        mask,
                        "--hashlimit-name",
                        &format!("syn{mask}"),
                        "-j",
                        "DROP",
                    ])?;
                }
                Ok(())
            }
        }
    }

    /// Remove what [`Limiter::install`] set up.
    pub fn remove(self, ns: &Netns) -> Result<()> {
        match self {
            Limiter::Nftables => ns.exec(&["nft", "delete", "table", "netdev", TABLE]),
            Limiter::Iptables => {
                for (cmd, _) in IPT {
                    ns.exec(&[cmd, "-t", "raw", "-F", "PREROUTING"])?;
                }
                Ok(())
            }
        }
    }

    /// SYNs it has dropped so far (0 if it is not installed).
    pub fn dropped(self, ns: &Netns) -> u64 {
        match self {
            Limiter::Nftables => ns
                .output(&["nft", "list", "table", "netdev", TABLE])
                .map(|o| sum_after(&o, "packets "))
                .unwrap_or(0),
            Limiter::Iptables => IPT
                .iter()
                .filter_map(|(cmd, _)| {
                    ns.output(&[cmd, "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"])
                        .ok()
                })
                // Rows: pkts bytes target …; the DROP rule's first column.
                .flat_map(|out| {
                    out.lines()
                        .filter(|l| l.contains("DROP"))
                        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                        .collect::<Vec<_>>()
                })
                .sum(),
        }
    }
}

/// The nftables table's name.
const TABLE: &str = "shaperlimit";

/// The iptables commands and their source masks.
const IPT: [(&str, &str); 2] = [("iptables", "24"), ("ip6tables", "64")];

/// The sum of the numbers after each `word` in `text`.
fn sum_after(text: &str, word: &str) -> u64 {
    text.split(word)
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}
