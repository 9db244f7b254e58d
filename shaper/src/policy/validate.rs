//! Semantic checks on a parsed policy. Every error found is reported, each at its place.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use toml::Spanned;

use super::{
    Action, Policy, PolicyError, PolicyErrors, Prefix, Rate, Rule, Share,
    raw::{RawDefaults, RawFleet, RawPolicy, RawProtect, RawRule, error_at},
};

/// Most rules a policy may hold at all (the largest `--max-rules`; what a data plane
/// holds is checked against its capacity before an apply).
pub const MAX_RULES: usize = crate::capacity::MAX_LIMIT as usize;
/// Highest rate accepted: one admission per microsecond per group.
const MAX_RATE_PER_S: u128 = 1_000_000;
const MAX_BURST: i64 = 1_000_000;
const MAX_WAIT_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(300));
/// Past every stack's last SYN retransmission (Linux's at ~67 s after the first SYN,
/// older Linux's at ~63 s), so each client's last knock still has its place.
const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(90);
/// Most clients one group may keep waiting (`max_waiting`).
const MAX_WAITING: u32 = 1_000_000;

/// Default line length of a group: twice what the budget can serve within `max_wait`
/// (clients beyond that would be forgotten before their turn), at least 16.
fn default_max_waiting(rate: Rate, burst: u64, max_wait: Duration) -> u32 {
    let servable = rate
        .per_second_ceil()
        .saturating_mul(max_wait.as_secs().max(1))
        .saturating_add(burst);
    u32::try_from(servable.saturating_mul(2))
        .unwrap_or(MAX_WAITING)
        .clamp(16, MAX_WAITING)
}

struct Checker<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<PolicyError>,
    warnings: Vec<PolicyError>,
}

impl Checker<'_> {
    fn at(&self, start: usize, message: impl Into<String>) -> PolicyError {
        error_at(self.file, self.text, start, message.into())
    }

    fn err<T>(&mut self, span: &Spanned<T>, message: impl Into<String>) {
        let e = self.at(span.span().start, message);
        self.errors.push(e);
    }

    /// Valid, but likely not what was meant: a warning at byte `start`.
    fn warn_at(&mut self, start: usize, message: impl Into<String>) {
        let w = self.at(start, message);
        self.warnings.push(w);
    }
}

/// What `[defaults]` sets for every rule.
struct Defaults {
    v4_group: u8,
    v6_group: u8,
    max_wait: Duration,
}

/// Names and prefixes of the rules so far (each may appear once).
#[derive(Default)]
struct Seen {
    names: HashMap<String, usize>,
    prefixes: HashMap<Prefix, String>,
}

pub fn validate(file: &str, text: &str, raw: RawPolicy) -> Result<Policy, PolicyErrors> {
    let mut c = Checker {
        file,
        text,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let d = defaults(&mut c, raw.defaults.as_ref().map(Spanned::get_ref));
    if let Some(extra) = raw.rules.get(MAX_RULES) {
        c.err(extra, format!("too many rules: at most {MAX_RULES}"));
    }
    let mut seen = Seen::default();
    let mut rules = Vec::new();
    for (i, r) in raw.rules.iter().enumerate() {
        if let Some(rule) = rule(&mut c, r.get_ref(), &d, &mut seen, i) {
            rules.push(rule);
        }
    }
    let (protected_prefixes, protected_ports) = protect(&mut c, raw.protect.as_ref());
    let fleet = fleet(&mut c, raw.fleet.as_ref());
    if !rules.is_empty() && !rules.iter().any(|r| matches!(r.prefix.addr, IpAddr::V6(_))) {
        c.warn_at(
            0,
            "no rule has an IPv6 prefix: IPv6 attempts are not limited (add one, e.g. \
             prefix = \"::/0\")",
        );
    }
    if c.errors.is_empty() {
        Ok(Policy {
            rules,
            protected_prefixes,
            protected_ports,
            fleet,
            warnings: c.warnings,
        })
    } else {
        Err(PolicyErrors(c.errors))
    }
}

/// `[defaults]`: group lengths per family and `max_wait`.
fn defaults(c: &mut Checker<'_>, raw: Option<&RawDefaults>) -> Defaults {
    let mut d = Defaults {
        v4_group: 24,
        v6_group: 64,
        max_wait: DEFAULT_MAX_WAIT,
    };
    if let Some(raw) = raw {
        if let Some(g) = &raw.ipv4_group {
            d.v4_group = group_len(c, g, 32, "ipv4_group").unwrap_or(d.v4_group);
        }
        if let Some(g) = &raw.ipv6_group {
            d.v6_group = group_len(c, g, 128, "ipv6_group").unwrap_or(d.v6_group);
        }
        if let Some(w) = &raw.max_wait {
            d.max_wait = wait(c, w).unwrap_or(d.max_wait);
        }
    }
    d
}

/// One `[[rule]]`, the `index`-th: every field checked (all its errors reported), then
/// the rule if all are valid.
fn rule(
    c: &mut Checker<'_>,
    r: &RawRule,
    d: &Defaults,
    seen: &mut Seen,
    index: usize,
) -> Option<Rule> {
    let name = r.name.get_ref();
    rule_name(c, r, seen, index);
    let prefix = rule_prefix(c, r, seen);
    let rate = parse_rate_value(c, &r.rate, "rate");
    let burst = rule_burst(c, r, rate);
    let group = rule_group(c, r, prefix, d);
    let action = match &r.action {
        None => Some(Action::Drop),
        Some(a) => a.get_ref().parse::<Action>().map_err(|e| c.err(a, e)).ok(),
    };
    let ceiling = rule_ceiling(c, r);
    let max_wait = match &r.max_wait {
        None => Some(d.max_wait),
        Some(w) => wait(c, w),
    };
    let max_waiting = rule_max_waiting(c, r);
    // Every field was checked above; a rule is made only if all are valid.
    let (prefix, rate, burst, max_wait) = (prefix?, rate?, burst?, max_wait?);
    let rule = Rule {
        name: name.clone(),
        prefix,
        rate,
        burst,
        group: group?,
        action: action?,
        ceiling: ceiling?,
        max_wait,
        max_waiting: max_waiting?.unwrap_or_else(|| default_max_waiting(rate, burst, max_wait)),
    };
    rule_warnings(c, r, &rule);
    Some(rule)
}

fn rule_name(c: &mut Checker<'_>, r: &RawRule, seen: &mut Seen, index: usize) {
    let name = r.name.get_ref();
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        c.err(
            &r.name,
            format!("invalid rule name `{name}`: use 1-64 letters, digits, `-`, `_` or `.`"),
        );
    } else if seen.names.contains_key(name) {
        c.err(&r.name, format!("duplicate rule name `{name}`"));
    }
    seen.names.insert(name.clone(), index);
}

fn rule_prefix(c: &mut Checker<'_>, r: &RawRule, seen: &mut Seen) -> Option<Prefix> {
    match Prefix::parse(r.prefix.get_ref()) {
        Ok(p) => {
            if let Some(other) = seen.prefixes.get(&p) {
                c.err(
                    &r.prefix,
                    format!("prefix {p} is already used by rule `{other}`"),
                );
            }
            seen.prefixes.insert(p, r.name.get_ref().clone());
            Some(p)
        }
        Err(e) => {
            c.err(&r.prefix, e);
            None
        }
    }
}

fn rule_burst(c: &mut Checker<'_>, r: &RawRule, rate: Option<Rate>) -> Option<u64> {
    match (&r.burst, rate) {
        (Some(b), _) => match *b.get_ref() {
            n if !(0..=MAX_BURST).contains(&n) => {
                c.err(b, format!("burst {n} is out of range 0..={MAX_BURST}"));
                None
            }
            0 if rate.is_some_and(|r| r.count > 0) => {
                c.err(
                    b,
                    "burst must be at least 1 when rate is above 0 (nothing could be admitted)",
                );
                None
            }
            n => u64::try_from(n).ok(),
        },
        // Default: one second's worth of the rate.
        (None, Some(rt)) => Some(rt.per_second_ceil()),
        (None, None) => None,
    }
}

fn rule_group(
    c: &mut Checker<'_>,
    r: &RawRule,
    prefix: Option<Prefix>,
    d: &Defaults,
) -> Option<u8> {
    match (&r.group, prefix) {
        (Some(gs), Some(p)) => match group_len(c, gs, p.max_len(), "group") {
            Some(g) if g < p.len => {
                c.err(
                    gs,
                    format!(
                        "group /{g} is wider than the rule's prefix /{}: use a length \
                         from {} to {}",
                        p.len,
                        p.len,
                        p.max_len()
                    ),
                );
                None
            }
            g => g,
        },
        (Some(g), None) => group_len(c, g, 128, "group"),
        // Default per family, never wider than the prefix itself.
        (None, Some(p)) => Some(
            if p.addr.is_ipv4() {
                d.v4_group
            } else {
                d.v6_group
            }
            .max(p.len),
        ),
        (None, None) => None,
    }
}

/// `ceiling`: `Some(None)` when there is none.
fn rule_ceiling(c: &mut Checker<'_>, r: &RawRule) -> Option<Option<Rate>> {
    let v = match &r.ceiling {
        None => return Some(None),
        Some(v) => v,
    };
    match parse_rate_value(c, v, "ceiling") {
        Some(rt) if rt.count == 0 => {
            c.err(
                v,
                "ceiling must be above 0 (use rate = 0 to refuse everything)",
            );
            None
        }
        Some(rt) => Some(Some(rt)),
        None => None,
    }
}

/// `max_waiting`: `Some(None)` when not set (the default depends on the rate).
fn rule_max_waiting(c: &mut Checker<'_>, r: &RawRule) -> Option<Option<u32>> {
    let q = match &r.max_waiting {
        None => return Some(None),
        Some(q) => q,
    };
    match u32::try_from(*q.get_ref()) {
        Ok(n) if (1..=MAX_WAITING).contains(&n) => Some(Some(n)),
        _ => {
            c.err(
                q,
                format!(
                    "max_waiting {} is out of range 1..={MAX_WAITING}",
                    q.get_ref()
                ),
            );
            None
        }
    }
}

/// What is valid in a rule but likely not meant.
fn rule_warnings(c: &mut Checker<'_>, r: &RawRule, rule: &Rule) {
    let name = &rule.name;
    if rule.action != Action::Defer {
        for key in [
            r.max_wait.as_ref().map(|w| w.span()),
            r.max_waiting.as_ref().map(|w| w.span()),
        ]
        .into_iter()
        .flatten()
        {
            c.warn_at(
                key.start,
                format!(
                    "rule `{name}`: max_wait and max_waiting only matter for action = \"defer\""
                ),
            );
        }
    }
    let prefix = rule.prefix;
    if let IpAddr::V6(a) = prefix.addr
        && a.to_ipv4_mapped().is_some()
        && prefix.len >= 96
    {
        c.warn_at(
            r.prefix.span().start,
            format!(
                "rule `{name}`: {prefix} is IPv4-mapped IPv6 and never matches (IPv4 \
                 attempts are matched as IPv4): write the IPv4 prefix"
            ),
        );
    }
}

/// `[protect]`: prefixes and ports, each listed once.
fn protect(c: &mut Checker<'_>, raw: Option<&Spanned<RawProtect>>) -> (Vec<Prefix>, Vec<u16>) {
    let mut prefixes = Vec::new();
    let mut ports = Vec::new();
    let Some(p) = raw else {
        return (prefixes, ports);
    };
    let p = p.get_ref();
    for s in &p.prefixes {
        match Prefix::parse(s.get_ref()) {
            Ok(px) if prefixes.contains(&px) => {
                c.err(s, format!("protected prefix {px} is listed twice"));
            }
            Ok(px) => prefixes.push(px),
            Err(e) => c.err(s, e),
        }
    }
    for port in &p.ports {
        match u16::try_from(*port.get_ref()) {
            Ok(n) if n > 0 => {
                if ports.contains(&n) {
                    c.err(port, format!("protected port {n} is listed twice"));
                }
                ports.push(n);
            }
            _ => c.err(
                port,
                format!("port {} is out of range 1..=65535", port.get_ref()),
            ),
        }
    }
    (prefixes, ports)
}

/// `[fleet]`: `nodes = N` or `share = 0.25` ("1/4", "25%"), not both.
fn fleet(c: &mut Checker<'_>, raw: Option<&Spanned<RawFleet>>) -> Option<Share> {
    let f = raw?;
    match (&f.get_ref().nodes, &f.get_ref().share) {
        (Some(_), Some(share)) => {
            c.err(share, "[fleet] takes `nodes` or `share`, not both");
            None
        }
        (Some(n), None) => u64::try_from(*n.get_ref())
            .map_err(|_| format!("nodes = {}: must be 1..=1000000", n.get_ref()))
            .and_then(Share::of_nodes)
            .map_err(|e| c.err(n, e))
            .ok(),
        (None, Some(share)) => {
            let text = match share.get_ref() {
                toml::Value::Float(x) => x.to_string(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::String(s) => s.clone(),
                _ => String::new(),
            };
            Share::parse(&text).map_err(|e| c.err(share, e)).ok()
        }
        (None, None) => {
            c.err(f, "[fleet] needs `nodes = N` or `share = 0.25`");
            None
        }
    }
}

fn group_len(c: &mut Checker<'_>, g: &Spanned<i64>, max: u8, field: &str) -> Option<u8> {
    match u8::try_from(*g.get_ref()) {
        Ok(n) if n <= max => Some(n),
        _ => {
            c.err(
                g,
                format!("{field} {} is out of range 0..={max}", g.get_ref()),
            );
            None
        }
    }
}

/// A rate: an integer (per second) or "N/s", "N/min", "N/h".
fn parse_rate_value(c: &mut Checker<'_>, v: &Spanned<toml::Value>, field: &str) -> Option<Rate> {
    let parsed = match v.get_ref() {
        toml::Value::Integer(n) => u64::try_from(*n)
            .map(|count| Rate {
                count,
                period_ns: 1_000_000_000,
            })
            .map_err(|_| format!("{field} must not be negative")),
        toml::Value::String(s) => parse_rate(s).map_err(|e| format!("{field}: {e}")),
        other => Err(format!(
            "{field} must be an integer (per second) or a string like \"20/s\" or \"1200/min\", not a {}",
            other.type_str()
        )),
    };
    match parsed {
        Ok(r) if u128::from(r.count) * 1_000_000_000 > MAX_RATE_PER_S * u128::from(r.period_ns) => {
            c.err(
                v,
                format!("{field} {r} is above the maximum of {MAX_RATE_PER_S}/s"),
            );
            None
        }
        Ok(r) => Some(r),
        Err(e) => {
            c.err(v, e);
            None
        }
    }
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    let (n, unit) = s.split_once('/').ok_or_else(|| {
        format!("`{s}` is not a rate; write it like \"20/s\", \"1200/min\" or \"3/h\"")
    })?;
    let count: u64 = n
        .trim()
        .parse()
        .map_err(|_| format!("`{n}` in `{s}` is not a whole number"))?;
    let period_ns = match unit.trim() {
        "s" | "sec" | "second" => 1_000_000_000,
        "m" | "min" | "minute" => 60_000_000_000,
        "h" | "hour" => 3_600_000_000_000,
        u => return Err(format!("unknown rate unit `{u}` in `{s}`: use s, min or h")),
    };
    Ok(Rate { count, period_ns })
}

fn wait(c: &mut Checker<'_>, w: &Spanned<toml::Value>) -> Option<Duration> {
    let (parsed, shown) = match w.get_ref() {
        toml::Value::String(s) => (parse_duration(s), s.clone()),
        toml::Value::Integer(n) => (
            u64::try_from(*n)
                .map(Duration::from_secs)
                .map_err(|_| format!("max_wait `{n}` is out of range 1s..=300s")),
            format!("{n}s"),
        ),
        other => (
            Err(format!(
                "max_wait must be a duration like \"30s\" or whole seconds, not a {}",
                other.type_str()
            )),
            String::new(),
        ),
    };
    match parsed {
        Ok(d) if d >= MAX_WAIT_RANGE.0 && d <= MAX_WAIT_RANGE.1 => Some(d),
        Ok(_) => {
            c.err(w, format!("max_wait `{shown}` is out of range 1s..=300s"));
            None
        }
        Err(e) => {
            c.err(w, e);
            None
        }
    }
}

/// "30s", "2min", "1500ms".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|ch: char| !ch.is_ascii_digit())
        .ok_or_else(|| format!("`{s}` needs a unit: ms, s or min"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like \"30s\""))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" | "min" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("`{s}` is too long")),
        _ => Err(format!("unknown unit `{unit}` in `{s}`: use ms, s or min")),
    }
}
