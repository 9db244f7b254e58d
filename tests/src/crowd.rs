//! A crowd of real kernel TCP clients: each connects once, at its own arrival time, and
//! its kernel retransmits the SYN on its own schedule until it connects or gives up.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use socket2::{Domain, Socket, Type};

use crate::netns::{Netns, enter};

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
}

/// A crowd running on its own thread inside a namespace.
pub struct Crowd {
    thread: Option<JoinHandle<Result<Vec<Attempt>>>>,
    connected: Arc<AtomicUsize>,
}

impl Crowd {
    /// Start `arrivals` (any order) towards `dst` from inside `ns`, relative to `t0`; stop
    /// waiting for the stragglers at `deadline`.
    pub fn start(
        ns: &Netns,
        mut arrivals: Vec<Arrival>,
        dst: SocketAddr,
        t0: Instant,
        deadline: Instant,
    ) -> Crowd {
        arrivals.sort_by_key(|a| a.at);
        let path = ns.path();
        let connected = Arc::new(AtomicUsize::new(0));
        let c2 = connected.clone();
        let thread = std::thread::spawn(move || {
            enter(&path)?;
            run(&arrivals, dst, t0, deadline, &c2)
        });
        Crowd {
            thread: Some(thread),
            connected,
        }
    }

    /// Clients connected so far.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Wait for the crowd (it ends by its deadline).
    pub fn finish(mut self) -> Result<Vec<Attempt>> {
        self.thread
            .take()
            .ok_or_else(|| anyhow!("finished twice"))?
            .join()
            .map_err(|_| anyhow!("crowd thread panicked"))?
    }
}

fn run(
    arrivals: &[Arrival],
    dst: SocketAddr,
    t0: Instant,
    deadline: Instant,
    connected: &AtomicUsize,
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
                        connected.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => a.failed = true,
                }
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
