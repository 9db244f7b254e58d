//! A real Prometheus server (Debian's `prometheus` package, which `cargo xtask setup`
//! installs) scraping the daemon's `/metrics` inside a test namespace every second, and
//! its HTTP API: instant and range queries. Used by the observability tests and by the
//! demo's dashboard picture.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::netns::Netns;

/// Prometheus's API port inside the namespace.
pub const PORT: u16 = 9090;

/// A Prometheus server running in a namespace; stopped and its data removed on drop.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    ns: PathBuf,
}

/// One series of a range query: its labels and its (Unix time, value) points.
#[derive(Clone, Debug)]
pub struct Series {
    pub labels: serde_json::Value,
    pub points: Vec<(f64, f64)>,
}

impl Prometheus {
    /// Start a server in `ns` that scrapes the daemon's default endpoint
    /// (127.0.0.1:9101) every second and evaluates `rules` (a rule file), if any.
    pub fn start(ns: &Netns, rules: Option<&Path>) -> Result<Prometheus> {
        let dir = std::env::temp_dir().join(format!("{}-prometheus", ns.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let rule_files = rules.map_or_else(String::new, |r| {
            format!("rule_files:\n  - {}\n", r.display())
        });
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{rule_files}\
                 scrape_configs:\n  - job_name: shaper\n    static_configs:\n      - targets: [\"127.0.0.1:9101\"]\n"
            ),
        )?;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{PORT}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = ns
            .spawn(&mut cmd)
            .context("prometheus (cargo xtask setup installs Debian's prometheus package)")?;
        Ok(Prometheus {
            child,
            dir,
            ns: ns.path(),
        })
    }

    fn get(&self, path: &str) -> Result<serde_json::Value> {
        let body = crate::http::get_at(&self.ns, PORT, path, "*/*")?.1;
        let v: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("Prometheus answered {body:.200}"))?;
        if v["status"] != "success" {
            bail!("Prometheus: {}", v["error"]);
        }
        Ok(v["data"].clone())
    }

    /// An instant query's result (`data.result`).
    pub fn query(&self, q: &str) -> Result<Vec<serde_json::Value>> {
        let d = self.get(&format!("/api/v1/query?query={}", escape(q)))?;
        d["result"]
            .as_array()
            .cloned()
            .ok_or_else(|| anyhow!("no result for {q}"))
    }

    /// A range query from `start` to `end` (Unix seconds) every `step` seconds.
    pub fn query_range(&self, q: &str, start: f64, end: f64, step: f64) -> Result<Vec<Series>> {
        let d = self.get(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
            escape(q)
        ))?;
        let result = d["result"]
            .as_array()
            .ok_or_else(|| anyhow!("no result for {q}"))?;
        Ok(result
            .iter()
            .map(|s| Series {
                labels: s["metric"].clone(),
                points: s["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| {
                        let t = p[0].as_f64()?;
                        let v = p[1].as_str()?.parse::<f64>().ok()?;
                        Some((t, v))
                    })
                    .collect(),
            })
            .collect())
    }

    /// How many times Prometheus has scraped the daemon (in the last 10 minutes).
    pub fn scrapes(&self) -> u32 {
        self.query("count_over_time(shaper_up[10m])")
            .ok()
            .and_then(|r| r.first()?["value"][1].as_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    }

    /// Wait until Prometheus has scraped the daemon `n` times (at most `within`).
    pub fn wait_scrapes(&self, n: u32, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.scrapes();
            if got >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("Prometheus scraped the daemon {got} times in {within:?}, not {n}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Now, in Unix seconds (Prometheus's time).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `s` percent-encoded for a URL's query.
pub fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
