//! The policy file: parse (TOML, unknown keys rejected), validate, compile to map entries.
//!
//! `check` and `apply` share [`load`]: a policy applies whole or not at all, and every
//! error names its place as `FILE:LINE:COL: message`.

mod cidr;
mod compile;
mod fleet;

pub use fleet::Share;
mod raw;
mod validate;

use std::{fmt, net::IpAddr, path::Path, time::Duration};

pub use cidr::Prefix;
pub use compile::Compiled;

/// What a rule does with attempts over its budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Monitor,
    Drop,
    Defer,
}

impl Action {
    /// Every action, in the order the docs list them.
    pub const ALL: [Action; 4] = [Action::Allow, Action::Monitor, Action::Drop, Action::Defer];

    /// The action's name in the policy file (and in `stats`).
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Monitor => "monitor",
            Action::Drop => "drop",
            Action::Defer => "defer",
        }
    }
}

impl std::str::FromStr for Action {
    type Err = String;

    /// An action by its name; the error lists the names there are.
    fn from_str(s: &str) -> Result<Action, String> {
        Action::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Action::ALL.iter().map(|a| a.name()).collect();
                format!(
                    "unknown action `{s}`: expected {} or {}",
                    names[..names.len() - 1].join(", "),
                    names[names.len() - 1]
                )
            })
    }
}

/// A rate: `count` per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rate {
    pub count: u64,
    pub period_ns: u64,
}

impl Rate {
    /// The rate's count over one second, rounded up (at least 1 unless the rate is 0).
    pub fn per_second_ceil(self) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let per_s = (u128::from(self.count) * 1_000_000_000).div_ceil(u128::from(self.period_ns));
        u64::try_from(per_s).unwrap_or(u64::MAX).max(1)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.period_ns {
            1_000_000_000 => write!(f, "{}/s", self.count),
            60_000_000_000 => write!(f, "{}/min", self.count),
            3_600_000_000_000 => write!(f, "{}/h", self.count),
            p => write!(f, "{}/{}ns", self.count, p),
        }
    }
}

/// One validated rule.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rule {
    pub name: String,
    pub prefix: Prefix,
    pub rate: Rate,
    pub burst: u64,
    /// Group length in bits (≥ the prefix length).
    pub group: u8,
    pub action: Action,
    pub ceiling: Option<Rate>,
    #[serde(with = "secs")]
    pub max_wait: Duration,
    /// `defer`: most clients one group keeps waiting.
    pub max_waiting: u32,
}

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Policy {
    pub rules: Vec<Rule>,
    pub protected_prefixes: Vec<Prefix>,
    pub protected_ports: Vec<u16>,
    /// `[fleet]`: this node's share of the quotas, as the file gives it (the daemon
    /// enforces [`Policy::shared`]; `shaper run --fleet-share` overrides it).
    pub fleet: Option<Share>,
    /// Valid, but likely not what was meant (`policy check` prints them, the daemon
    /// logs them).
    #[serde(skip)]
    pub warnings: Vec<PolicyError>,
}

impl Policy {
    /// Is `addr` protected by prefix?
    pub fn protects(&self, addr: IpAddr) -> bool {
        self.protected_prefixes.iter().any(|p| p.contains(addr))
    }
}

/// One problem in a policy file, at a place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl PolicyError {
    /// As a warning: `FILE:LINE:COL: warning: message`.
    pub fn warning(&self) -> String {
        format!(
            "{}:{}:{}: warning: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Every problem found in a policy file (at least one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Read and validate a policy file.
pub fn load(path: &Path) -> Result<Policy, PolicyErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        PolicyErrors(vec![PolicyError {
            file: name.clone(),
            line: 1,
            col: 1,
            message: format!("cannot read the policy file: {e}"),
        }])
    })?;
    parse(&name, &text)
}

/// FNV-1a (64 bits) of `bytes`: the policy's hash that `status` shows, and each
/// rule's definition hash that keeps its id.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_from(FNV_OFFSET, bytes)
}

/// FNV-1a's starting value.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a of `bytes` continued from `h` (the hash of the bytes before them).
pub fn fnv1a_from(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Validate policy text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Policy, PolicyErrors> {
    let raw = raw::parse(file, text)?;
    validate::validate(file, text, raw)
}

mod secs {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests;
