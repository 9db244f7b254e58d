//! The control socket's protocol: length-delimited frames (a 4-byte big-endian length,
//! then a JSON body), each a versioned request or response. The daemon serves it
//! ([`crate::daemon`]) on a Unix socket to root peers only (SO_PEERCRED); there is no
//! network listener. [`crate::client`] is the other end.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use shaper_common::Outcome;

/// Version of the protocol; a daemon refuses requests of another version.
pub const PROTOCOL: u32 = 1;
/// Largest frame either side accepts: a policy of a million rules is about 60 MB of
/// text, and `stats` of tens of thousands of rules some MB (the socket serves root
/// only, so the size is not a guard against strangers).
pub const MAX_FRAME: usize = 256 << 20;
/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/shaper/shaper.sock";

/// A request with its protocol version.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Envelope<T> {
    pub version: u32,
    pub body: T,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    Stats,
    PolicyShow,
    /// Validate `text` (named `file` in errors) and switch to it, all or nothing.
    PolicyApply {
        file: String,
        text: String,
        /// The CLI's SSH client address (SSH_CONNECTION), for the lock-out guard.
        ssh_client: Option<String>,
        force: bool,
    },
    /// Re-read the daemon's config file.
    Reload,
    /// The `n` groups closest to (or over) their budget (of one rule, if named).
    Top {
        n: u32,
        #[serde(default)]
        rule: Option<String>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Status(Status),
    Stats(Stats),
    Policy(PolicyView),
    Applied { generation: u64, hash: String },
    Top { groups: Vec<TopGroup> },
    Error { message: String },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub protocol: u32,
    pub pid: u32,
    pub uptime_s: u64,
    pub config: String,
    pub generation: u64,
    pub policy_hash: String,
    /// This node's share of the policy's quotas (`1/1`: all of them; `[fleet]`).
    #[serde(default = "whole")]
    pub fleet_share: String,
    pub interfaces: Vec<IfaceStatus>,
}

fn whole() -> String {
    "1/1".to_string()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IfaceStatus {
    pub iface: String,
    /// `native`, `skb`, or `unknown`.
    pub mode: String,
    pub prog_id: u32,
    pub link_id: u32,
    pub adopted: bool,
    pub pin_dir: String,
    pub maps: Vec<MapFill>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapFill {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    pub rules: Vec<RuleStatsView>,
    pub global: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RuleStatsView {
    pub name: String,
    pub prefix: String,
    pub action: String,
    /// SYNs by outcome, one field per outcome named as [`Outcome::name`] says
    /// (`admitted`, `dropped`, …): a new outcome is a new field with no change here.
    #[serde(flatten)]
    pub outcomes: BTreeMap<String, u64>,
    /// Waits of clients admitted after waiting, as a cumulative histogram: for each
    /// upper bound in seconds, in order (`"+Inf"` last, the count of all), how many
    /// waited at most that long.
    pub wait_buckets: Vec<WaitBucket>,
    pub wait_sum_s: f64,
    /// Clients waiting in the rule's lines now (`defer`).
    #[serde(default)]
    pub waiting: u64,
    /// Places released after `max_wait` (clients that most likely gave up).
    #[serde(default)]
    pub released: u64,
}

impl RuleStatsView {
    /// The count of one outcome (0 if the daemon did not send it).
    pub fn get(&self, o: Outcome) -> u64 {
        self.outcomes.get(o.name()).copied().unwrap_or(0)
    }
}

/// One bucket of a cumulative wait histogram.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitBucket {
    /// Upper bound in seconds, or `"+Inf"`.
    pub le: String,
    /// Waits at most `le` long.
    pub count: u64,
}

/// Per-bucket wait counts (bucket `i` up to `bounds[i]` seconds, the last unbounded)
/// as a cumulative histogram.
pub fn cumulative_waits(bounds: &[u64], counts: &[u64]) -> Vec<WaitBucket> {
    let mut total = 0u64;
    counts
        .iter()
        .enumerate()
        .map(|(i, n)| {
            total = total.saturating_add(*n);
            WaitBucket {
                le: bounds.get(i).map_or("+Inf".to_string(), u64::to_string),
                count: total,
            }
        })
        .collect()
}

/// One group in `shaper top` (addresses appear here, never in metrics labels).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopGroup {
    pub iface: String,
    pub rule: String,
    /// The group's prefix, e.g. `198.51.100.0/24`.
    pub group: String,
    /// Admissions of the burst in use now (0: full budget; `burst`: none left).
    pub burst_used: f64,
    pub burst: u64,
    /// Refused an attempt in the last 3 s (`defer` groups wait in line then).
    pub congested: bool,
    /// Clients that joined the group's line recently (`defer`).
    pub joined_line: u32,
    /// Clients waiting in the group's line now.
    #[serde(default)]
    pub waiting: u32,
    /// How long the oldest of them has waited, in seconds (0: nobody waits).
    #[serde(default)]
    pub oldest_wait_s: f64,
    /// The group's SYNs so far (wrapping counters; `top` shows their rates):
    /// admitted (with or without waiting), dropped (or would be, `monitor`), deferred.
    #[serde(default)]
    pub admitted: u32,
    #[serde(default)]
    pub dropped: u32,
    #[serde(default)]
    pub deferred: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyView {
    pub generation: u64,
    pub hash: String,
    pub source: String,
    pub policy: serde_json::Value,
}

/// A stable hash of a policy's text (FNV-1a 64, hex): equal texts, equal hashes.
pub fn policy_hash(text: &str) -> String {
    format!("{:016x}", crate::policy::fnv1a(text.as_bytes()))
}

/// Write one frame.
pub fn write_frame(w: &mut impl std::io::Write, body: &[u8]) -> Result<()> {
    if body.len() > MAX_FRAME {
        bail!(
            "frame of {} bytes is over the {MAX_FRAME}-byte limit",
            body.len()
        );
    }
    w.write_all(&(body.len() as u32).to_be_bytes())?;
    w.write_all(body)?;
    w.flush()?;
    Ok(())
}

/// Read one frame.
pub fn read_frame(r: &mut impl std::io::Read) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        bail!("frame of {len} bytes is over the {MAX_FRAME}-byte limit");
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::{WaitBucket, cumulative_waits};

    #[test]
    fn wait_buckets_are_cumulative_and_in_order() {
        let b = cumulative_waits(&[1, 2, 4, 8, 16, 32, 64], &[3, 0, 2, 0, 0, 0, 1, 4]);
        let got: Vec<(&str, u64)> = b.iter().map(|w| (w.le.as_str(), w.count)).collect();
        assert_eq!(
            got,
            [
                ("1", 3),
                ("2", 3),
                ("4", 5),
                ("8", 5),
                ("16", 5),
                ("32", 5),
                ("64", 6),
                ("+Inf", 10)
            ]
        );
        let json = serde_json::to_string(&b[0]).expect("json");
        assert_eq!(json, r#"{"le":"1","count":3}"#);
        let _: WaitBucket = serde_json::from_str(&json).expect("round trip");
    }
}
