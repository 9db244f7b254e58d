//! `shaper run`: load (or adopt) the pinned data plane on each interface, enforce the
//! policy, serve the control socket, reload on SIGHUP or when the config file changes.
//! SIGTERM/SIGINT stop the daemon and leave the program attached: stopping protection is
//! `shaper detach`, not a restart.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use shaper::{
    attach::{self, Attachment},
    control::{
        self, Envelope, IfaceStatus, MapFill, PolicyView, Request, Response, RuleStatsView, Stats,
        Status, TopGroup,
    },
    dataplane::{Capacity, Dataplane},
    pins,
    policy::{self, Action, Policy},
};
use shaper_common::{
    Outcome, Reason,
    maps::{WAIT_BOUNDS_S, WAIT_BUCKETS},
};
use tokio::{
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::cli::RunArgs;

/// One protected interface.
struct Iface {
    dp: Dataplane,
    att: Attachment,
    dir: PathBuf,
}

/// What the daemon enforces, shared by the signal loop and the socket handlers.
struct State {
    ifaces: Vec<Iface>,
    policy: Policy,
    /// Each rule's id in the data plane (stable across applies and restarts).
    ids: Vec<u32>,
    source: String,
    hash: String,
    generation: u64,
    config: PathBuf,
    /// Hash of the config file's content when last read: a change of the file (not a
    /// `policy apply` from elsewhere) triggers a reload.
    file_hash: String,
    started: Instant,
}

pub fn run(args: RunArgs) -> Result<()> {
    let source = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading the policy file {}", args.config.display()))?;
    let policy = policy::parse(&args.config.display().to_string(), &source).map_err(|e| {
        anyhow!(
            "{e}\nthe policy is invalid; nothing was loaded (check it with `shaper policy check`)"
        )
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        pins::ensure_root(&args.pin_root)?;
        let mut ifaces = Vec::new();
        let mut ids = Vec::new();
        for iface in &args.ifaces {
            let dir = pins::iface_dir(&args.pin_root, iface);
            let d2 = dir.clone();
            // Loading runs the verifier: keep it off the async thread.
            let mut dp = tokio::task::spawn_blocking(move || {
                Dataplane::load_pinned(Capacity::default(), &d2)
            })
            .await
            .context("the loader task failed")??;
            ids = dp
                .apply_policy(&policy)
                .context("writing the policy into the maps")?;
            let verified = dp.verified_instructions();
            let att = attach::attach_pinned(dp.program()?, iface, args.mode, &dir, args.replace)?;
            tracing::info!(
                iface,
                mode = att.mode.map_or("unknown".to_string(), |m| m.to_string()),
                prog_id = att.prog_id,
                link_id = att.link_id,
                verified_insns = verified.unwrap_or(0),
                pins = %dir.display(),
                "{}",
                if att.adopted {
                    "adopted the pinned link; program replaced atomically"
                } else {
                    "attached"
                }
            );
            forward_bpf_logs(&mut dp, iface);
            ifaces.push(Iface { dp, att, dir });
        }
        let hash = control::policy_hash(&source);
        for w in &policy.warnings {
            tracing::warn!("{}", w.warning());
        }
        tracing::info!(
            rules = policy.rules.len(),
            config = %args.config.display(),
            hash = %hash,
            "enforcing"
        );
        let state = Arc::new(Mutex::new(State {
            ifaces,
            policy,
            ids,
            source,
            file_hash: hash.clone(),
            hash,
            generation: 1,
            config: args.config.clone(),
            started: Instant::now(),
        }));
        let listener = listen(&args.socket)?;
        notify("READY=1");

        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        let every = Duration::from_secs(args.stats_interval.max(1));
        let mut tick = tokio::time::interval(every);
        let mut watch = tokio::time::interval(Duration::from_secs(1));
        let mut pending: Option<String> = None;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    let _ = reload(&state, "SIGHUP");
                }
                _ = watch.tick() => {
                    // A changed file is applied once it reads the same a second later:
                    // an editor or `cp` caught halfway is never applied.
                    match (config_changed(&state), &pending) {
                        (Some(h), Some(p)) if h == *p => {
                            pending = None;
                            let _ = reload(&state, "the config file changed");
                        }
                        (changed, _) => pending = changed,
                    }
                }
                _ = tick.tick(), if args.stats_interval > 0 => {
                    if let Ok(s) = state.lock() {
                        log_counters(&s);
                    }
                }
                conn = listener.accept() => match conn {
                    Ok((stream, _)) => {
                        let st = state.clone();
                        tokio::spawn(async move { serve(stream, st).await });
                    }
                    Err(e) => tracing::warn!(error = %e, "control socket accept"),
                },
            }
        }
        notify("STOPPING=1");
        let _ = std::fs::remove_file(&args.socket);
        if let Ok(s) = state.lock() {
            log_counters(&s);
            for i in &s.ifaces {
                tracing::info!(
                    iface = %i.att.iface,
                    pins = %i.dir.display(),
                    "exiting; the program stays attached and keeps enforcing the policy \
                     (`shaper detach {}` removes it)",
                    i.att.iface
                );
            }
        }
        Ok(())
    })
}

/// The program's records, as the daemon's own log events (target `bpf`). The kernel
/// already filtered them by level (`SHAPER_BPF_LOG`), so all of them are forwarded.
struct BpfLog;

impl log::Log for BpfLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let msg = r.args();
        match r.level() {
            log::Level::Error => tracing::error!(target: "bpf", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "bpf", "{msg}"),
            // Records that reached here were asked for: show them at info and below.
            _ => tracing::info!(target: "bpf", level = %r.level(), "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Forward the XDP program's log records (aya-log) into the daemon's log.
fn forward_bpf_logs(dp: &mut Dataplane, iface: &str) {
    let logger = match aya_log::EbpfLogger::init_with_logger(&mut dp.ebpf, &BpfLog as &dyn log::Log)
    {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(iface, error = %e, "the program's log records are not forwarded");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd for as long as it lives, and the
    // AsyncFd owns the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(iface, error = %e, "the program's log records are not forwarded");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Bind the control socket, mode 0600. A missing directory is made with mode 0700; an
/// existing one is left as it is (`--socket /tmp/s.sock` must not change `/tmp`): the
/// daemon checks every peer's credentials anyway. A live socket means another daemon
/// is running, and anything at the path that is not a socket is not ours: refuse both.
fn listen(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another shaper daemon is serving {}; stop it first (or use --socket)",
                    path.display()
                );
            }
            // A socket nobody serves: a daemon that died left it.
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "--socket: {} exists and is not a socket; choose another path (or remove it)",
            path.display()
        ),
        Err(_) => {}
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Tell systemd (Type=notify) when NOTIFY_SOCKET is set.
fn notify(msg: &str) {
    use std::os::linux::net::SocketAddrExt as _;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(&path),
    };
    if let Ok(addr) = addr
        && let Err(e) = sock.send_to_addr(msg.as_bytes(), &addr)
    {
        tracing::warn!(error = %e, "notifying systemd");
    }
}

/// The config file's hash, if it differs from the one last read.
fn config_changed(state: &Arc<Mutex<State>>) -> Option<String> {
    let s = state.lock().ok()?;
    let text = std::fs::read_to_string(&s.config).ok()?;
    let h = control::policy_hash(&text);
    (h != s.file_hash).then_some(h)
}

/// Read the config file again and apply it. A refusal keeps the old policy, and is
/// reported where the reload was asked: in the log, to systemd (`STATUS=`, which
/// `systemctl status` shows) and to a client (an error reply).
fn reload(state: &Arc<Mutex<State>>, why: &str) -> Result<(u64, String), String> {
    notify("RELOADING=1");
    let result = reload_locked(state, why);
    match &result {
        Ok((generation, hash)) => {
            tracing::info!(generation, hash = %hash, "reloaded ({why})");
            notify(&format!(
                "READY=1\nSTATUS=enforcing policy generation {generation} (hash {hash})"
            ));
        }
        Err(e) => {
            tracing::error!("reload ({why}) refused; the old policy stays:\n{e}");
            let first = e.lines().next().unwrap_or_default();
            notify(&format!(
                "READY=1\nSTATUS=reload ({why}) refused, the old policy stays: {first}"
            ));
        }
    }
    result
}

fn reload_locked(state: &Arc<Mutex<State>>, why: &str) -> Result<(u64, String), String> {
    let mut s = state
        .lock()
        .map_err(|_| format!("reload ({why}): internal error: state lock poisoned"))?;
    let config = s.config.clone();
    let text = std::fs::read_to_string(&config)
        .map_err(|e| format!("{}: cannot read the config: {e}", config.display()))?;
    s.file_hash = control::policy_hash(&text);
    apply(&mut s, &config.display().to_string(), &text, None, false)
}

/// Validate `text` whole, then write it into every interface's maps.
fn apply(
    s: &mut State,
    file: &str,
    text: &str,
    ssh: Option<&str>,
    force: bool,
) -> Result<(u64, String), String> {
    let policy = policy::parse(file, text).map_err(|e| e.to_string())?;
    for w in &policy.warnings {
        tracing::warn!("{}", w.warning());
    }
    if !force && policy.rules.is_empty() {
        // An empty or truncated file parses; enforcing it would lift every limit.
        return Err(format!(
            "{file}: the policy has no rules; applying it would lift every limit: refusing \
             (to mean it: `shaper policy apply --force`)"
        ));
    }
    if !force && let Some(why) = ssh.and_then(|c| locks_out(&policy, c)) {
        return Err(format!(
            "{why}; refusing to apply (add the address to [protect] prefixes, or pass --force)"
        ));
    }
    let compiled = policy.compile();
    for i in &s.ifaces {
        i.dp.capacity.check(&compiled)?;
    }
    let mut ids = Vec::new();
    for i in &mut s.ifaces {
        ids = i.dp.apply_policy(&policy).map_err(|e| format!("{e:#}"))?;
    }
    s.ids = ids;
    s.policy = policy;
    s.source = text.to_string();
    s.hash = control::policy_hash(text);
    s.generation += 1;
    Ok((s.generation, s.hash.clone()))
}

/// Would `policy` limit new connections of the SSH session `ssh_connection`
/// ("client port server port")? Returns why.
fn locks_out(policy: &Policy, ssh_connection: &str) -> Option<String> {
    let mut parts = ssh_connection.split_whitespace();
    let client: IpAddr = parts.next()?.parse().ok()?;
    let server_port: Option<u16> = parts.nth(2).and_then(|p| p.parse().ok());
    if policy.protects(client) || server_port.is_some_and(|p| policy.protected_ports.contains(&p)) {
        return None;
    }
    let rule = policy
        .rules
        .iter()
        .filter(|r| r.prefix.contains(client))
        .max_by_key(|r| r.prefix.len)?;
    matches!(rule.action, Action::Drop | Action::Defer).then(|| {
        format!(
            "rule `{}` ({}, {}) would limit new connections from your SSH client {client}",
            rule.name,
            rule.prefix,
            rule.action.name()
        )
    })
}

/// Serve one control connection: root peers only; every bad frame gets an error reply.
async fn serve(stream: UnixStream, state: Arc<Mutex<State>>) {
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(control::MAX_FRAME)
        .new_codec();
    let mut framed = Framed::new(stream, codec);
    if uid != Some(0) {
        tracing::warn!(?uid, "control socket: refused a non-root peer");
        let _ = send(
            &mut framed,
            &error("permission denied: the control socket serves root only (run as root)"),
        )
        .await;
        return;
    }
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), framed.next()).await;
        let frame = match next {
            Err(_) | Ok(None) => return,
            Ok(Some(Err(e))) => {
                let _ = send(&mut framed, &error(&format!("bad frame: {e}"))).await;
                return;
            }
            Ok(Some(Ok(f))) => f,
        };
        let reply = match serde_json::from_slice::<Envelope<Request>>(&frame) {
            Err(e) => error(&format!("malformed request: {e}")),
            Ok(env) if env.version != control::PROTOCOL => error(&format!(
                "protocol version {} is not supported (this daemon speaks {})",
                env.version,
                control::PROTOCOL
            )),
            Ok(env) => handle(&state, env.body),
        };
        if send(&mut framed, &reply).await.is_err() {
            return;
        }
    }
}

fn error(message: &str) -> Response {
    Response::Error {
        message: message.to_string(),
    }
}

async fn send(framed: &mut Framed<UnixStream, LengthDelimitedCodec>, r: &Response) -> Result<()> {
    let body = serde_json::to_vec(r)?;
    framed.send(bytes::Bytes::from(body)).await?;
    Ok(())
}

fn handle(state: &Arc<Mutex<State>>, req: Request) -> Response {
    let Ok(mut s) = state.lock() else {
        return error("internal error: state lock poisoned");
    };
    match req {
        Request::Status => Response::Status(status(&s)),
        Request::Stats => Response::Stats(stats(&s)),
        Request::PolicyShow => Response::Policy(PolicyView {
            generation: s.generation,
            hash: s.hash.clone(),
            source: s.source.clone(),
            policy: serde_json::to_value(&s.policy).unwrap_or_default(),
        }),
        Request::PolicyApply {
            file,
            text,
            ssh_client,
            force,
        } => match apply(&mut s, &file, &text, ssh_client.as_deref(), force) {
            Ok((generation, hash)) => {
                tracing::info!(generation, hash = %hash, file, "policy applied");
                Response::Applied { generation, hash }
            }
            Err(message) => Response::Error { message },
        },
        Request::Top { n } => Response::Top {
            groups: top(&s, n as usize),
        },
        Request::Reload => {
            drop(s);
            match reload(state, "requested") {
                Ok((generation, hash)) => Response::Applied { generation, hash },
                Err(message) => Response::Error { message },
            }
        }
    }
}

fn status(s: &State) -> Status {
    Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: control::PROTOCOL,
        pid: std::process::id(),
        uptime_s: s.started.elapsed().as_secs(),
        config: s.config.display().to_string(),
        generation: s.generation,
        policy_hash: s.hash.clone(),
        interfaces: s
            .ifaces
            .iter()
            .map(|i| IfaceStatus {
                iface: i.att.iface.clone(),
                mode: i
                    .att
                    .mode
                    .or_else(|| attach::kernel_mode(&i.att.iface))
                    .map_or("unknown".to_string(), |m| m.to_string()),
                prog_id: i.att.prog_id,
                link_id: i.att.link_id,
                adopted: i.att.adopted,
                pin_dir: i.dir.display().to_string(),
                maps: i
                    .dp
                    .fill_levels()
                    .into_iter()
                    .map(|(name, entries, capacity)| MapFill {
                        name: name.to_string(),
                        entries,
                        capacity,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The groups nearest to (or over) their budget, congested ones first.
fn top(s: &State, n: usize) -> Vec<TopGroup> {
    // bpf_ktime_get_ns is CLOCK_MONOTONIC.
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    let mut out = Vec::new();
    for i in &s.ifaces {
        for (key, st) in i.dp.groups() {
            let Some(pos) = s.ids.iter().position(|id| *id == st.rule_id) else {
                continue;
            };
            let Some(rule) = s.policy.rules.get(pos) else {
                continue;
            };
            if key.len != rule.group {
                // A probe entry only (the rule groups by another length).
                continue;
            }
            let budget =
                shaper_common::Budget::new(rule.rate.count, rule.rate.period_ns, rule.burst);
            let used = if budget.interval_ns == 0 {
                rule.burst as f64
            } else {
                st.tat_ns.saturating_sub(now) as f64 / budget.interval_ns as f64
            };
            let addr: IpAddr = if rule.prefix.addr.is_ipv4() {
                let [a, b, c, d, ..] = key.addr;
                IpAddr::from([a, b, c, d])
            } else {
                IpAddr::from(key.addr)
            };
            out.push(TopGroup {
                iface: i.att.iface.clone(),
                rule: rule.name.clone(),
                group: format!("{addr}/{}", rule.group),
                burst_used: used.min(rule.burst as f64),
                burst: rule.burst,
                congested: now < st.line.congested_until_ns,
                joined_line: st.line.q_cur.saturating_add(st.line.q_prev),
            });
        }
    }
    out.sort_by(|a, b| {
        b.congested
            .cmp(&a.congested)
            .then(b.burst_used.total_cmp(&a.burst_used))
            .then(b.joined_line.cmp(&a.joined_line))
    });
    out.truncate(n);
    out
}

fn stats(s: &State) -> Stats {
    let mut out = Stats::default();
    for (pos, rule) in s.policy.rules.iter().enumerate() {
        let Some(&id) = s.ids.get(pos) else { continue };
        let mut v = RuleStatsView {
            name: rule.name.clone(),
            prefix: rule.prefix.to_string(),
            action: rule.action.name().to_string(),
            ..RuleStatsView::default()
        };
        let mut wait = [0u64; WAIT_BUCKETS];
        let mut sum_ns = 0u64;
        for i in &s.ifaces {
            let Ok(c) = i.dp.rule_counters(id) else {
                continue;
            };
            v.admitted += c.get(Outcome::Admitted);
            v.dropped += c.get(Outcome::Dropped);
            v.deferred += c.get(Outcome::Deferred);
            v.admitted_after_wait += c.get(Outcome::AdmittedAfterWait);
            v.queue_full += c.get(Outcome::QueueFull);
            v.would_drop += c.get(Outcome::WouldDrop);
            v.protected += c.get(Outcome::Protected);
            for (w, x) in wait.iter_mut().zip(c.wait.iter()) {
                *w += x;
            }
            sum_ns = sum_ns.wrapping_add(c.wait_sum_ns);
        }
        v.wait_buckets = control::cumulative_waits(&WAIT_BOUNDS_S, &wait);
        v.wait_sum_s = sum_ns as f64 / 1e9;
        out.rules.push(v);
    }
    for i in &s.ifaces {
        if let Ok(g) = i.dp.global_counters() {
            for (r, n) in Reason::ALL.iter().zip(g) {
                *out.global.entry(r.name().to_string()).or_default() += n;
            }
        }
    }
    out
}

fn log_counters(s: &State) {
    let st = stats(s);
    let line: Vec<String> = st
        .global
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    tracing::info!(counters = %line.join(" "), "global");
    for r in &st.rules {
        tracing::info!(
            rule = %r.name,
            admitted = r.admitted,
            dropped = r.dropped,
            deferred = r.deferred,
            admitted_after_wait = r.admitted_after_wait,
            queue_full = r.queue_full,
            would_drop = r.would_drop,
            protected = r.protected,
            "rule"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::listen;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("shaper-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    #[test]
    fn an_existing_directory_keeps_its_mode() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        let _in_rt = rt.enter();
        let d = scratch("sock-mode");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let sock = d.join("s.sock");
        let l = listen(&sock).expect("listen");
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o755);
        assert_eq!(mode(&sock), 0o600);
        // A missing directory is made, private.
        let deeper = d.join("run/shaper/s.sock");
        let l2 = listen(&deeper).expect("listen in a new directory");
        assert_eq!(mode(&d.join("run/shaper")), 0o700);
        // A second daemon on a live socket is refused.
        let again = listen(&sock).expect_err("a live socket");
        assert!(
            again.to_string().contains("another shaper daemon"),
            "{again}"
        );
        drop((l, l2));
        // A stale socket (nobody serving it) is replaced.
        listen(&sock).expect("a stale socket is replaced");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_path_that_is_not_a_socket_is_left_alone() {
        let d = scratch("sock-file");
        let f = d.join("important.txt");
        std::fs::write(&f, "keep me").expect("write");
        let e = listen(&f).expect_err("a regular file");
        assert!(e.to_string().starts_with("--socket: "), "{e}");
        assert_eq!(std::fs::read_to_string(&f).expect("still there"), "keep me");
        let _ = std::fs::remove_dir_all(&d);
    }
}
