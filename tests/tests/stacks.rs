//! The emulated client stacks retransmit their SYNs on their own schedules: one client
//! of each stack connects towards an address nobody answers (a static neighbour entry
//! with a MAC nobody has), and the SYNs are timed where they leave, on the veth's
//! other end. The first 22 s of each schedule are checked (all of Windows', which gives
//! up at 21 s), the four stacks side by side.

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use shaper_tests::{
    netns::{Netns, enter, veth},
    stacks::Stack,
};
use socket2::{Domain, Socket, Type};

const WATCH: Duration = Duration::from_secs(22);

/// SYN times (s after the first) and when `connect` gave up, if it did.
type Seen = (Vec<f64>, Option<f64>);

/// Seconds (after the first) of every SYN leaving `cli`, and whether `connect` failed
/// with a timeout before `WATCH` ran out.
fn observe(stack: Stack) -> Result<Seen> {
    let cli = Netns::new("stk")?;
    let sink = Netns::new("sink")?;
    veth(&cli, "c0", &sink, "s0")?;
    cli.ip(&["addr", "add", "198.18.0.2/24", "dev", "c0"])?;
    cli.ip(&[
        "neigh",
        "add",
        "198.18.0.1",
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "c0",
    ])?;
    let emu = stack.emulate(&cli)?;
    let path = sink.path();
    let cap = std::thread::spawn(move || -> Result<Vec<Instant>> {
        enter(&path)?;
        // SAFETY: plain socket call; owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM,
                i32::from((libc::ETH_P_IP as u16).to_be()),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        // SAFETY: a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: a valid socket and timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        let end = Instant::now() + WATCH + Duration::from_secs(1);
        let mut seen = Vec::new();
        let mut buf = [0u8; 128];
        while Instant::now() < end {
            // SAFETY: a valid buffer of its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            // IPv4 + TCP with SYN set and ACK clear.
            if n >= 40 && buf[9] == 6 && buf[33] & 0x12 == 0x02 {
                seen.push(Instant::now());
            }
        }
        Ok(seen)
    });
    std::thread::sleep(Duration::from_millis(300));
    let cg = emu.as_ref().map(|e| e.cgroup.clone());
    let gave_up = std::thread::scope(|s| {
        s.spawn(|| -> Result<Option<f64>> {
            // The sock_ops program reaches sockets of processes in its cgroup only:
            // this check runs the client in a child process that joins it.
            let dst = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 1), 80));
            if let Some(cg) = &cg {
                return run_in_cgroup(&cli, cg, dst);
            }
            cli.run_in(move || -> Result<Option<f64>> {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                s.bind(&SocketAddr::from((Ipv4Addr::new(198, 18, 0, 2), 0)).into())?;
                let t = Instant::now();
                match s.connect_timeout(&dst.into(), WATCH) {
                    Err(e) if e.raw_os_error() == Some(libc::ETIMEDOUT) && t.elapsed() < WATCH => {
                        Ok(Some(t.elapsed().as_secs_f64()))
                    }
                    _ => Ok(None),
                }
            })?
        })
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))?
    })?;
    let seen = cap
        .join()
        .map_err(|_| anyhow::anyhow!("capture panicked"))??;
    let Some(first) = seen.first().copied() else {
        bail!("{}: no SYN seen", stack.name());
    };
    Ok((
        seen.iter().map(|t| (*t - first).as_secs_f64()).collect(),
        gave_up,
    ))
}

/// A client in a child process that joins `cgroup` first (the crowd helper's way).
fn run_in_cgroup(ns: &Netns, cgroup: &std::path::Path, dst: SocketAddr) -> Result<Option<f64>> {
    use shaper_tests::crowd::{Arrival, Crowd};
    let t0 = Instant::now();
    let crowd = Crowd::start(
        ns,
        &[Arrival {
            at: Duration::ZERO,
            src: "198.18.0.2".parse()?,
        }],
        dst,
        t0,
        t0 + WATCH,
        Some(cgroup),
    )?;
    let a = crowd.finish()?;
    Ok(a.first()
        .filter(|a| a.failed)
        .and_then(|a| a.ended.map(|e| (e - a.started).as_secs_f64())))
}

#[test]
fn every_stack_retransmits_on_its_schedule() {
    shaper_tests::progrun::require_bpf();
    let results: Vec<(Stack, Result<Seen>)> = std::thread::scope(|s| {
        let hs: Vec<_> = Stack::ALL
            .iter()
            .map(|&st| (st, s.spawn(move || observe(st))))
            .collect();
        hs.into_iter()
            .map(|(st, h)| {
                (
                    st,
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked"))),
                )
            })
            .collect()
    });
    for (stack, r) in results {
        let (seen, gave_up) = r.unwrap_or_else(|e| panic!("{}: {e:#}", stack.name()));
        let (sched, give_up) = stack.schedule();
        let expect: Vec<u64> = sched
            .iter()
            .copied()
            .filter(|&t| t as f64 <= WATCH.as_secs_f64() - 1.0)
            .collect();
        println!(
            "{:>9}: SYNs at {seen:.2?}, gave up at {gave_up:.2?}",
            stack.name()
        );
        assert_eq!(
            seen.len(),
            expect.len(),
            "{}: SYNs at {seen:.2?}, expected {expect:?}",
            stack.name()
        );
        for (got, want) in seen.iter().zip(&expect) {
            // The timer wheel makes each retransmission a little late, never early; the
            // lateness adds up along the schedule (~2–6% here).
            let want = *want as f64;
            assert!(
                *got >= want - 0.01 && *got <= want * 1.08 + 0.1,
                "{}: a SYN at {got:.3} s where the schedule says {want} s ({seen:.2?})",
                stack.name()
            );
        }
        match gave_up {
            Some(t) => assert!(
                (t - give_up as f64).abs() < 2.5,
                "{} gave up at {t:.1} s, expected {give_up} s",
                stack.name()
            ),
            None => assert!(
                give_up as f64 > WATCH.as_secs_f64(),
                "{} did not give up within {WATCH:?}",
                stack.name()
            ),
        }
    }
}
