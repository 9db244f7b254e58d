//! A crowd of real kernel TCP clients: each connects once, at its own arrival time, and
//! its kernel retransmits the SYN on its own schedule until it connects or gives up.
//!
//! A crowd runs in a process of its own (`shaper-crowd`, this crate's helper binary)
//! inside its client namespace, so that it can join a cgroup of its own first: that is
//! how the Windows stack's sock_ops program reaches only its sockets
//! ([`crate::stacks`]). The plan goes in on stdin, results come back on stdout.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use socket2::{Domain, Socket, Type};

use crate::netns::Netns;

/// One client: when it arrives (after the crowd's start) and its source address.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub at: Duration,
    pub src: IpAddr,
}

/// What happened to one client.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    pub src: IpAddr,
    /// When `connect` was called (its first SYN).
    pub started: Instant,
    /// When the connection was established, if it was before the deadline.
    pub connected: Option<Instant>,
    /// The kernel gave up (ETIMEDOUT or another error) before the deadline.
    pub failed: bool,
    /// When it connected or gave up (`None`: still trying at the deadline).
    pub ended: Option<Instant>,
    /// SYNs the client sent before it connected (TCP_INFO's retransmissions + 1); 0 if
    /// it did not connect.
    pub syns: u32,
}

/// A crowd running in its own process inside a namespace.
pub struct Crowd {
    child: Child,
    reader: Option<JoinHandle<Result<Vec<Attempt>>>>,
    connected: Arc<AtomicUsize>,
}

/// The helper binary: `$SHAPER_CROWD_BIN`, else next to the running executable (or
/// next to its `deps/` directory, where cargo puts integration tests).
pub fn crowd_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SHAPER_CROWD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join("shaper-crowd");
    if p.exists() {
        Ok(p)
    } else {
        bail!(
            "no crowd helper at {}: build it (`cargo build -p shaper-tests --bins`) or set SHAPER_CROWD_BIN",
            p.display()
        )
    }
}

fn to_mono(i: Instant) -> u64 {
    let (now, m) = (Instant::now(), shaper::clock::monotonic_ns());
    match i.checked_duration_since(now) {
        Some(ahead) => m + ahead.as_nanos() as u64,
        None => m.saturating_sub((now - i).as_nanos() as u64),
    }
}

fn from_mono(ns: u64) -> Instant {
    let (now, m) = (Instant::now(), shaper::clock::monotonic_ns());
    if ns >= m {
        now + Duration::from_nanos(ns - m)
    } else {
        now.checked_sub(Duration::from_nanos(m - ns)).unwrap_or(now)
    }
}

impl Crowd {
    /// Start `arrivals` (any order) towards `dst` from inside `ns`, relative to `t0`; stop
    /// waiting for the stragglers at `deadline`. With `cgroup`, the crowd's process joins
    /// it before it opens a socket.
    pub fn start(
        ns: &Netns,
        arrivals: &[Arrival],
        dst: SocketAddr,
        t0: Instant,
        deadline: Instant,
        cgroup: Option<&Path>,
    ) -> Result<Crowd> {
        let mut cmd = Command::new(crowd_bin()?);
        if let Some(cg) = cgroup {
            cmd.arg("--cgroup").arg(cg);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = ns.spawn(&mut cmd).context("starting the crowd helper")?;
        let mut plan = format!("{} {} {dst}\n", to_mono(t0), to_mono(deadline));
        for a in arrivals {
            plan.push_str(&format!("{} {}\n", a.at.as_nanos(), a.src));
        }
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("the crowd helper has no stdin"))?;
        stdin.write_all(plan.as_bytes())?;
        drop(stdin);
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("the crowd helper has no stdout"))?;
        let connected = Arc::new(AtomicUsize::new(0));
        let c2 = connected.clone();
        let reader = std::thread::spawn(move || read_results(BufReader::new(stdout), &c2));
        Ok(Crowd {
            child,
            reader: Some(reader),
            connected,
        })
    }

    /// Clients connected so far.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn is_finished(&self) -> bool {
        self.reader.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Wait for the crowd (it ends by its deadline).
    pub fn finish(mut self) -> Result<Vec<Attempt>> {
        let r = self
            .reader
            .take()
            .ok_or_else(|| anyhow!("finished twice"))?
            .join()
            .map_err(|_| anyhow!("crowd reader panicked"))?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the crowd helper failed ({status})");
        }
        r
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_results(out: impl std::io::BufRead, connected: &AtomicUsize) -> Result<Vec<Attempt>> {
    let mut v = Vec::new();
    for line in out.lines() {
        let line = line?;
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["c"] => {
                connected.fetch_add(1, Ordering::Relaxed);
            }
            ["a", src, started, conn, failed, ended, syns] => {
                let at = |s: &str| -> Result<Option<Instant>> {
                    Ok(match s.parse::<u64>()? {
                        0 => None,
                        t => Some(from_mono(t)),
                    })
                };
                v.push(Attempt {
                    src: src.parse()?,
                    started: from_mono(started.parse()?),
                    connected: at(conn)?,
                    failed: *failed == "1",
                    ended: at(ended)?,
                    syns: syns.parse()?,
                })
            }
            ["end"] => return Ok(v),
            _ => bail!("crowd helper: unexpected line `{line}`"),
        }
    }
    bail!("the crowd helper ended without its results")
}

/// The helper's side: join the cgroup if asked, read the plan from stdin, run it,
/// print the results.
pub fn helper_main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {}
        [flag, cg] if flag == "--cgroup" => {
            std::fs::write(
                Path::new(cg).join("cgroup.procs"),
                std::process::id().to_string(),
            )
            .with_context(|| format!("joining cgroup {cg}"))?;
        }
        _ => bail!("usage: shaper-crowd [--cgroup DIR] < plan"),
    }
    let mut lines = std::io::stdin().lock().lines();
    let head = lines.next().ok_or_else(|| anyhow!("empty plan"))??;
    let h: Vec<&str> = head.split_whitespace().collect();
    let [t0, deadline, dst] = h.as_slice() else {
        bail!("bad plan head `{head}`");
    };
    let (t0, deadline) = (from_mono(t0.parse()?), from_mono(deadline.parse()?));
    let dst: SocketAddr = dst.parse()?;
    let mut arrivals = Vec::new();
    for l in lines {
        let l = l?;
        let Some((at, src)) = l.split_once(' ') else {
            bail!("bad plan line `{l}`");
        };
        arrivals.push(Arrival {
            at: Duration::from_nanos(at.parse()?),
            src: src.parse()?,
        });
    }
    arrivals.sort_by_key(|a| a.at);
    let out = std::io::stdout();
    let attempts = run(&arrivals, dst, t0, deadline, &mut || {
        let mut o = out.lock();
        let _ = writeln!(o, "c");
        let _ = o.flush();
    })?;
    let mut o = out.lock();
    for a in attempts {
        writeln!(
            o,
            "a {} {} {} {} {} {}",
            a.src,
            to_mono(a.started),
            a.connected.map_or(0, to_mono),
            u8::from(a.failed),
            a.ended.map_or(0, to_mono),
            a.syns
        )?;
    }
    writeln!(o, "end")?;
    Ok(())
}

/// SYN retransmissions of a connected socket (TCP_INFO's `tcpi_total_retrans`).
fn syn_retransmits(s: &Socket) -> u32 {
    // SAFETY: a zeroed tcp_info is a valid buffer; the kernel fills what it knows.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket and buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc == 0 { info.tcpi_total_retrans } else { 0 }
}

fn run(
    arrivals: &[Arrival],
    dst: SocketAddr,
    t0: Instant,
    deadline: Instant,
    on_connect: &mut dyn FnMut(),
) -> Result<Vec<Attempt>> {
    let mut done: Vec<Attempt> = Vec::with_capacity(arrivals.len());
    let mut pending: Vec<(Socket, Attempt)> = Vec::new();
    let mut next = 0;
    loop {
        let now = Instant::now();
        if now >= deadline || (next == arrivals.len() && pending.is_empty()) {
            break;
        }
        while let Some(a) = arrivals.get(next)
            && t0 + a.at <= now
        {
            let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
            s.bind(&SocketAddr::new(a.src, 0).into())
                .with_context(|| format!("bind {}", a.src))?;
            s.set_nonblocking(true)?;
            let started = Instant::now();
            match s.connect(&dst.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e).context("connect"),
            }
            pending.push((
                s,
                Attempt {
                    src: a.src,
                    started,
                    connected: None,
                    failed: false,
                    ended: None,
                    syns: 0,
                },
            ));
            next += 1;
        }
        let wait = arrivals
            .get(next)
            .map_or(Duration::from_millis(5), |a| {
                (t0 + a.at).saturating_duration_since(now)
            })
            .min(Duration::from_millis(5));
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|(s, _)| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                wait.as_millis() as i32,
            )
        };
        if n <= 0 {
            continue;
        }
        let at = Instant::now();
        let ready: Vec<bool> = fds.iter().map(|f| f.revents != 0).collect();
        let mut keep = Vec::with_capacity(pending.len());
        for (i, (s, mut a)) in pending.drain(..).enumerate() {
            if ready.get(i).copied().unwrap_or(false) {
                match s.take_error() {
                    Ok(None) => {
                        a.connected = Some(at);
                        a.syns = syn_retransmits(&s) + 1;
                        on_connect();
                    }
                    _ => a.failed = true,
                }
                a.ended = Some(at);
                done.push(a);
            } else {
                keep.push((s, a));
            }
        }
        pending = keep;
    }
    done.extend(pending.into_iter().map(|(_, a)| a));
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_parse_and_count_connections() {
        let text = "c\nc\na 198.18.1.10 100 200 0 200 3\na 198.18.1.11 100 0 1 900 0\nend\n";
        let n = AtomicUsize::new(0);
        let v = read_results(BufReader::new(text.as_bytes()), &n).expect("parses");
        assert_eq!(n.load(Ordering::Relaxed), 2);
        assert_eq!(v.len(), 2);
        assert!(v[0].connected.is_some() && v[0].syns == 3);
        assert!(v[1].connected.is_none() && v[1].failed && v[1].ended.is_some());
        assert!(read_results(BufReader::new("a x\n".as_bytes()), &n).is_err());
    }
}
