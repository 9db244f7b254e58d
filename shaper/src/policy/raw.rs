//! The policy file as written, with the byte span of every value for error messages.

use serde::Deserialize;
use toml::Spanned;

use super::{PolicyError, PolicyErrors};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub defaults: Option<Spanned<RawDefaults>>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<Spanned<RawRule>>,
    pub protect: Option<Spanned<RawProtect>>,
    pub fleet: Option<Spanned<RawFleet>>,
}

/// `[fleet]`: this node's share of the platform's quotas, by node count or fraction.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    pub nodes: Option<Spanned<i64>>,
    /// A fraction: 0.25, "1/4" or "25%".
    pub share: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    pub ipv4_group: Option<Spanned<i64>>,
    pub ipv6_group: Option<Spanned<i64>>,
    /// A duration ("30s", "2min", "1500ms") or whole seconds.
    pub max_wait: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: Spanned<String>,
    pub prefix: Spanned<String>,
    /// An integer (per second) or a string: "20/s", "1200/min", "3/h".
    pub rate: Spanned<toml::Value>,
    pub burst: Option<Spanned<i64>>,
    pub group: Option<Spanned<i64>>,
    pub action: Option<Spanned<String>>,
    pub ceiling: Option<Spanned<toml::Value>>,
    /// A duration ("30s", "2min", "1500ms") or whole seconds.
    pub max_wait: Option<Spanned<toml::Value>>,
    /// `defer`: most clients one group keeps waiting.
    pub max_waiting: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProtect {
    #[serde(default)]
    pub prefixes: Vec<Spanned<String>>,
    #[serde(default)]
    pub ports: Vec<Spanned<i64>>,
}

/// Parse the TOML; syntax and shape errors carry their place.
pub fn parse(file: &str, text: &str) -> Result<RawPolicy, PolicyErrors> {
    toml::from_str(text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start);
        PolicyErrors(vec![error_at(
            file,
            text,
            at,
            // One line per error: the parser's message can run over several.
            e.message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        )])
    })
}

/// An error at byte offset `at` of `text`, as FILE:LINE:COL (1-based, columns in chars).
pub fn error_at(file: &str, text: &str, at: usize, message: String) -> PolicyError {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    PolicyError {
        file: file.to_string(),
        line,
        col,
        message,
    }
}
