//! Real kernel TCP traffic: a server that records every accepted connection, storms of
//! client connection attempts, and a long-lived bulk transfer.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use socket2::{Domain, Socket, Type};

use crate::netns::{Netns, enter};

/// One accepted connection.
#[derive(Clone, Copy, Debug)]
pub struct Accepted {
    pub peer: SocketAddr,
    pub at: Instant,
}

/// Listens on addresses inside a namespace and records what it accepts. Connections
/// are closed right away, except on the bulk port, whose data is read and checked.
pub struct Server {
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    bulk: Arc<Mutex<BulkStats>>,
    thread: Option<JoinHandle<Result<()>>>,
}

/// What the server saw on the bulk connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct BulkStats {
    pub bytes: u64,
    pub corrupt: bool,
    /// Longest time between two reads that returned data, once data started.
    pub max_gap: Duration,
}

/// The port the bulk transfer uses.
pub const BULK_PORT: u16 = 9000;

fn listener(addr: SocketAddr) -> Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

impl Server {
    /// Listen on `addrs` (plus the bulk port on the first address's IP) inside `ns`.
    pub fn start(ns: &Netns, addrs: &[SocketAddr]) -> Result<Server> {
        let path = ns.path();
        let addrs = addrs.to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let bulk = Arc::new(Mutex::new(BulkStats::default()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s2, a2, b2) = (stop.clone(), accepted.clone(), bulk.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            let setup = (|| -> Result<(Vec<Socket>, Socket)> {
                enter(&path)?;
                let ls = addrs
                    .iter()
                    .map(|a| listener(*a))
                    .collect::<Result<Vec<_>>>()?;
                let first = addrs.first().ok_or_else(|| anyhow!("no address"))?;
                let b = listener(SocketAddr::new(first.ip(), BULK_PORT))?;
                Ok((ls, b))
            })();
            let (ls, bulk_l) = match setup {
                Ok(v) => {
                    let _ = ready_tx.send(Ok(()));
                    v
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return Err(e);
                }
            };
            let mut bulk_conn: Option<TcpStream> = None;
            let mut buf = vec![0u8; 1 << 16];
            let mut last_data: Option<Instant> = None;
            while !s2.load(Ordering::Relaxed) {
                let mut idle = true;
                for l in &ls {
                    while let Ok((sock, peer)) = l.accept() {
                        idle = false;
                        let at = Instant::now();
                        if let Some(peer) = peer.as_socket()
                            && let Ok(mut v) = a2.lock()
                        {
                            v.push(Accepted { peer, at });
                        }
                        drop(sock);
                    }
                }
                if let Ok((sock, _)) = bulk_l.accept() {
                    let s: TcpStream = sock.into();
                    s.set_nonblocking(true)?;
                    bulk_conn = Some(s);
                }
                if let Some(c) = bulk_conn.as_mut() {
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) => {
                                bulk_conn = None;
                                break;
                            }
                            Ok(n) => {
                                idle = false;
                                let now = Instant::now();
                                if let Ok(mut b) = b2.lock() {
                                    for (i, byte) in buf.iter().take(n).enumerate() {
                                        if *byte != pattern(b.bytes + i as u64) {
                                            b.corrupt = true;
                                        }
                                    }
                                    b.bytes += n as u64;
                                    if let Some(l) = last_data {
                                        b.max_gap = b.max_gap.max(now - l);
                                    }
                                }
                                last_data = Some(now);
                            }
                            Err(_) => break,
                        }
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_micros(500));
                }
            }
            Ok(())
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(anyhow!("server setup: {e}")),
            Err(_) => return Err(anyhow!("server did not start")),
        }
        Ok(Server {
            stop,
            accepted,
            bulk,
            thread: Some(thread),
        })
    }

    pub fn accepted(&self) -> Vec<Accepted> {
        self.accepted.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn bulk(&self) -> BulkStats {
        self.bulk.lock().map(|b| *b).unwrap_or_default()
    }

    pub fn stop(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| anyhow!("server thread panicked"))??;
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The bulk transfer's byte at offset `i`.
pub fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// What a storm did.
pub struct Storm {
    /// Sockets still open (closing them stops their SYN retransmissions).
    pub sockets: Vec<Socket>,
    pub first: Instant,
    pub last: Instant,
}

/// Open `rate` connections per second from `src` to `dst` for `dur`, non-blocking, on
/// a thread inside `ns`. Bounded: at most `rate × dur` attempts.
pub fn storm(ns: &Netns, src: IpAddr, dst: SocketAddr, rate: u32, dur: Duration) -> Result<Storm> {
    ns.run_in(move || -> Result<Storm> {
        let n = (f64::from(rate) * dur.as_secs_f64()) as u32;
        let step = Duration::from_secs_f64(1.0 / f64::from(rate));
        let first = Instant::now();
        let mut last = first;
        let mut sockets = Vec::with_capacity(n as usize);
        for i in 0..n {
            let due = first + step * i;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
            s.bind(&SocketAddr::new(src, 0).into())
                .with_context(|| format!("bind {src}"))?;
            s.set_nonblocking(true)?;
            last = Instant::now();
            match s.connect(&dst.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e).context("connect"),
            }
            sockets.push(s);
        }
        Ok(Storm {
            sockets,
            first,
            last,
        })
    })?
}

/// A long-lived connection writing the pattern at a steady pace on its own thread.
pub struct Bulk {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<BulkResult>>>,
}

/// What the bulk sender saw.
#[derive(Clone, Copy, Debug)]
pub struct BulkResult {
    pub bytes: u64,
    /// Segments the kernel retransmitted (TCP_INFO tcpi_total_retrans).
    pub retransmits: u32,
    /// Longest time a write blocked or waited.
    pub max_stall: Duration,
}

impl Bulk {
    /// Connect from `src` to `dst` (port [`BULK_PORT`]) in `ns`; write 16 KiB every 10 ms.
    pub fn start(ns: &Netns, src: IpAddr, dst: IpAddr) -> Result<Bulk> {
        let path = ns.path();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || -> Result<BulkResult> {
            enter(&path)?;
            let dst = SocketAddr::new(dst, BULK_PORT);
            let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
            s.bind(&SocketAddr::new(src, 0).into())?;
            s.connect_timeout(&dst.into(), Duration::from_secs(5))
                .context("bulk connect")?;
            let _ = tx.send(());
            let mut stream: TcpStream = s.into();
            stream.set_write_timeout(Some(Duration::from_secs(5)))?;
            let mut sent = 0u64;
            let mut max_stall = Duration::ZERO;
            let chunk = 16 * 1024;
            while !s2.load(Ordering::Relaxed) {
                let data: Vec<u8> = (0..chunk).map(|i| pattern(sent + i as u64)).collect();
                let t = Instant::now();
                stream.write_all(&data).context("bulk write")?;
                max_stall = max_stall.max(t.elapsed());
                sent += chunk as u64;
                std::thread::sleep(Duration::from_millis(10));
            }
            let retransmits = tcp_retransmits(&stream)?;
            Ok(BulkResult {
                bytes: sent,
                retransmits,
                max_stall,
            })
        });
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("bulk connection did not establish"))?;
        Ok(Bulk {
            stop,
            thread: Some(thread),
        })
    }

    pub fn finish(mut self) -> Result<BulkResult> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .ok_or_else(|| anyhow!("finished twice"))?
            .join()
            .map_err(|_| anyhow!("bulk thread panicked"))?
    }
}

impl Drop for Bulk {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn tcp_retransmits(s: &TcpStream) -> Result<u32> {
    // SAFETY: zeroed tcp_info is valid; getsockopt writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("TCP_INFO");
    }
    Ok(info.tcpi_total_retrans)
}
