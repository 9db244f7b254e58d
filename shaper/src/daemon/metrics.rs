//! `/metrics` for Prometheus: the counters read from the per-CPU maps at scrape time
//! (no polling thread that can lag), in the Prometheus text format, or OpenMetrics
//! when the scraper asks for it. Labels are rule names, outcomes, reasons, interfaces
//! and map names; never addresses.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ACCEPT, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};
use shaper_common::{Outcome, Reason, maps::WAIT_BOUNDS_S};
use tokio::net::TcpListener;

use super::state::State;

/// Default address of the endpoint (`--metrics`).
pub const DEFAULT_ADDR: &str = "127.0.0.1:9101";

/// Bind the endpoint now (a taken port is an error at start, naming the flag), then
/// serve it on the runtime.
pub async fn start(addr: SocketAddr, state: Arc<Mutex<State>>) -> Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("--metrics: cannot listen on {addr} (another port, or `--metrics off`)")
    })?;
    tracing::info!(%addr, "serving /metrics");
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(state)));
    let registry = Arc::new(registry);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| respond(req, registry.clone()));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}

async fn respond(
    req: Request<Incoming>,
    registry: Arc<Registry>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, kind: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = kind.parse() {
            r.headers_mut().insert(CONTENT_TYPE, v);
        }
        Ok(r)
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "shaper serves /metrics only\n".into(),
        );
    }
    let openmetrics = req
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let mut body = String::new();
    let (encoded, kind) = if openmetrics {
        (
            prometheus_client::encoding::text::encode(&mut body, &registry),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut body, &registry),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    match encoded {
        Ok(()) => reply(StatusCode::OK, kind, body),
        Err(_) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            "encoding the metrics failed\n".into(),
        ),
    }
}

/// `t` as Unix seconds (0 before 1970).
fn unix_seconds(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Reads the daemon's state at each scrape.
struct Scrape(Arc<Mutex<State>>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

type Labels<'a> = [(&'static str, &'a str)];

/// One metric family: a descriptor, then one sample per label set.
fn family<'a, T: prometheus_client::encoding::EncodeMetric + 'a>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Vec<(&'static str, &'a str)>, T)>,
) -> std::fmt::Result {
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let kind = first.metric_type();
    let mut m = encoder.encode_descriptor(name, help, unit, kind)?;
    for (labels, v) in samples {
        let labels: &Labels<'_> = labels.as_slice();
        v.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let Ok(mut s) = self.0.lock() else {
            return Ok(());
        };
        // The lines first: places past their `max_wait` are released (and counted)
        // before the counters are read.
        let lines = super::report::line(&mut s);
        let now = crate::clock::monotonic_ns();
        family(
            &mut e,
            "shaper_up",
            "1 while the daemon serves (its absence: the daemon is down).",
            None,
            [(vec![], ConstGauge::new(1i64))],
        )?;
        let version = env!("CARGO_PKG_VERSION");
        let info: Vec<(&'static str, &str)> = vec![("version", version)];
        e.encode_descriptor(
            "shaper_build",
            "The daemon's build.",
            None,
            MetricType::Info,
        )?
        .encode_info(&info.as_slice())?;
        family(
            &mut e,
            "shaper_policy_generation",
            "Policy generation in force (1 at start, one more per apply or reload).",
            None,
            [(vec![], ConstGauge::new(s.generation as i64))],
        )?;
        let hash = s.hash.clone();
        e.encode_descriptor(
            "shaper_policy",
            "The policy in force, by the hash `status` shows.",
            None,
            MetricType::Info,
        )?
        .encode_info(&[("hash", hash.as_str())].as_slice())?;
        family(
            &mut e,
            "shaper_rules",
            "Rules in the policy in force.",
            None,
            [(vec![], ConstGauge::new(s.policy.rules.len() as i64))],
        )?;
        family(
            &mut e,
            "shaper_policy_applied_timestamp_seconds",
            "When the policy in force was applied (Unix time).",
            None,
            [(vec![], ConstGauge::new(unix_seconds(s.applied_at)))],
        )?;
        if let Some((ok, at)) = s.last_reload {
            family(
                &mut e,
                "shaper_last_reload_success",
                "1 if the last reload (SIGHUP, file change, request) was applied, 0 if it \
                 was refused and the old policy stayed.",
                None,
                [(vec![], ConstGauge::new(i64::from(ok)))],
            )?;
            family(
                &mut e,
                "shaper_last_reload_timestamp_seconds",
                "When the last reload was asked for (Unix time).",
                None,
                [(vec![], ConstGauge::new(unix_seconds(at)))],
            )?;
        }
        family(
            &mut e,
            "shaper_rule_max_wait_seconds",
            "How long a `defer` rule's clients keep their place in line.",
            None,
            s.policy
                .rules
                .iter()
                .filter(|r| r.action == crate::policy::Action::Defer)
                .map(|r| {
                    (
                        vec![("rule", r.name.as_str())],
                        ConstGauge::new(r.max_wait.as_secs_f64()),
                    )
                }),
        )?;
        // Per interface: what the data plane counted.
        let mut syns = Vec::new();
        let mut reasons = Vec::new();
        let mut waits = Vec::new();
        let mut fill = Vec::new();
        let mut attach = Vec::new();
        let mut attached = Vec::new();
        let mut line = Vec::new();
        for (i, line_now) in s.ifaces.iter().zip(&lines) {
            let iface = i.att.iface.as_str();
            let by_rule = super::report::line_by_rule(&line_now.waiting);
            // What the kernel runs there now (one netlink request): whether it is still
            // our program (a detach by another tool shows here first), and its mode.
            let kernel = crate::attach::kernel_xdp(iface);
            let ours = kernel.is_some_and(|x| x.prog_id == i.att.prog_id);
            let mode = i.att.mode_name(|| kernel.and_then(|x| x.mode));
            attached.push((iface, i64::from(ours)));
            attach.push((iface, mode, i.att.prog_id.to_string()));
            for (pos, rule) in s.policy.rules.iter().enumerate() {
                let Some(&id) = s.ids.get(pos) else { continue };
                let Ok(c) = i.dp.rule_counters(id) else {
                    continue;
                };
                for o in Outcome::ALL {
                    syns.push((rule.name.as_str(), o.name(), iface, c.get(o)));
                }
                // Only a `defer` rule's clients wait (eight buckets a rule otherwise).
                if rule.action == crate::policy::Action::Defer {
                    waits.push((rule.name.as_str(), iface, c));
                    let t = super::report::tally_of(&by_rule, &id);
                    line.push((
                        rule.name.as_str(),
                        iface,
                        t.waiting,
                        t.oldest_wait_s(now),
                        c.released,
                    ));
                }
            }
            if let Ok(g) = i.dp.global_counters() {
                for (r, n) in Reason::ALL.iter().zip(g) {
                    reasons.push((r.name(), iface, n));
                }
            }
            for (map, entries, capacity) in i.dp.fill_levels(Some(line_now.entries)) {
                fill.push((map, iface, entries, capacity));
            }
        }
        family(
            &mut e,
            "shaper_syns",
            "New connection attempts (SYNs) by rule and outcome.",
            None,
            syns.iter().map(|(rule, outcome, iface, n)| {
                (
                    vec![
                        ("rule", *rule),
                        ("outcome", *outcome),
                        ("interface", *iface),
                    ],
                    ConstCounter::new(*n),
                )
            }),
        )?;
        family(
            &mut e,
            "shaper_packets",
            "Packets by what the program did with them (reason).",
            None,
            reasons.iter().map(|(reason, iface, n)| {
                (
                    vec![("reason", *reason), ("interface", *iface)],
                    ConstCounter::new(*n),
                )
            }),
        )?;
        if !waits.is_empty() {
            let mut m = e.encode_descriptor(
                "shaper_wait",
                "How long clients admitted after waiting in a `defer` line waited, from \
                 their first SYN.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (rule, iface, c) in &waits {
                let mut total = 0u64;
                let buckets: Vec<(f64, u64)> = c
                    .wait
                    .iter()
                    .enumerate()
                    .map(|(k, n)| {
                        total = total.saturating_add(*n);
                        let le = WAIT_BOUNDS_S.get(k).map_or(f64::INFINITY, |b| *b as f64);
                        (le, *n)
                    })
                    .collect();
                let labels: &Labels<'_> = &[("rule", *rule), ("interface", *iface)];
                m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                    c.wait_sum_ns as f64 / 1e9,
                    total,
                    &buckets,
                    None,
                )?;
            }
        }
        family(
            &mut e,
            "shaper_line_waiting",
            "Clients waiting in a `defer` rule's lines now (places within `max_wait`).",
            None,
            line.iter().map(|(rule, iface, n, _, _)| {
                (
                    vec![("rule", *rule), ("interface", *iface)],
                    ConstGauge::new(i64::try_from(*n).unwrap_or(i64::MAX)),
                )
            }),
        )?;
        family(
            &mut e,
            "shaper_line_oldest_wait_seconds",
            "How long the oldest client waiting in a `defer` rule's lines has waited (0: \
             nobody waits).",
            None,
            line.iter().map(|(rule, iface, _, oldest, _)| {
                (
                    vec![("rule", *rule), ("interface", *iface)],
                    ConstGauge::new(*oldest),
                )
            }),
        )?;
        family(
            &mut e,
            "shaper_line_released",
            "Places in a `defer` rule's lines released after `max_wait`: clients that \
             most likely gave up (counted when the client knocks after it, or when a \
             scrape, `stats` or `top` finds the place expired).",
            None,
            line.iter().map(|(rule, iface, _, _, released)| {
                (
                    vec![("rule", *rule), ("interface", *iface)],
                    ConstCounter::new(*released),
                )
            }),
        )?;
        family(
            &mut e,
            "shaper_map_entries",
            "Entries in use in the maps that fill up (rule tries, groups, waiters, lines).",
            None,
            fill.iter().map(|(map, iface, n, _)| {
                (
                    vec![("map", *map), ("interface", *iface)],
                    ConstGauge::new(i64::try_from(*n).unwrap_or(i64::MAX)),
                )
            }),
        )?;
        family(
            &mut e,
            "shaper_map_capacity",
            "Entries each of those maps holds (fill ratio: entries / capacity).",
            None,
            fill.iter().map(|(map, iface, _, cap)| {
                (
                    vec![("map", *map), ("interface", *iface)],
                    ConstGauge::new(i64::try_from(*cap).unwrap_or(i64::MAX)),
                )
            }),
        )?;
        family(
            &mut e,
            "shaper_attached",
            "1 while the kernel runs this daemon's program on the interface.",
            None,
            attached
                .iter()
                .map(|(iface, v)| (vec![("interface", *iface)], ConstGauge::new(*v))),
        )?;
        if !attach.is_empty() {
            let mut m = e.encode_descriptor(
                "shaper_attach",
                "The program on each interface: attach mode and program id.",
                None,
                MetricType::Info,
            )?;
            for (iface, mode, prog) in &attach {
                let labels: &Labels<'_> = &[
                    ("interface", *iface),
                    ("mode", mode.as_str()),
                    ("program_id", prog.as_str()),
                ];
                m.encode_info(&labels)?;
            }
        }
        Ok(())
    }
}
