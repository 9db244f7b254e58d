//! `cargo xtask bench flood`: what a SYN flood costs the CPU that receives it, through
//! shaper, nftables, iptables and a bare XDP drop, on the same veth from the same
//! generator.
//!
//! The generator runs in the kernel (`shaper-ebpf/src/benchgen.rs`): frames loop
//! between veths `a0` and `a1`, and `flood_fan` on `a1` broadcasts each through a
//! devmap, one copy back into the loop and 63 to veth `g0`, each copy given a source
//! of its own by the devmap program `flood_src`. (`BPF_PROG_TEST_RUN` with live frames
//! would do the same from one system call; this kernel refuses it.) The loop's NAPI
//! poll runs on CPU 0. The peer `r0` receives the copies as from a NIC, in a threaded
//! NAPI poll pinned to CPU 1: everything the receiving side does (the XDP program, or
//! building the skb and running the netfilter hooks) runs in that one kernel thread,
//! whose run time (`/proc/PID/schedstat`) over the frames it took (`ethtool -S`) is the
//! cost per packet. Each filter limits SYNs per /24 (per /64 for IPv6) to 1/s with a
//! burst of 2, so nearly every flood SYN is dropped, and the drops each filter counts
//! itself are reported too.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMap},
    programs::{Xdp, xdp::XdpMode},
};

use crate::{
    flood::Raw,
    netfilter::Limiter,
    netns::{Netns, ifindex},
    packets::{ETH_IPV4, ETH_IPV6, SYN, ether, ipv4_tcp, ipv6_tcp},
    progrun::{Harness, pin_thread},
};

/// The generator's veth and the receiving one (whose MAC the frames are sent to).
const GEN_DEV: &str = "g0";
const RX_DEV: &str = "r0";
const RX_MAC: &str = "02:00:00:00:00:01";
/// The generator's loop: frames sent on `a0` come back on `a1`.
const LOOP_TX: &str = "a0";
const LOOP_RX: &str = "a1";
/// Entries of the generator's devmap (`FAN`): all but one are copies to `g0`.
const FAN: u32 = 64;
/// Frames injected into the loop at the start of a round: two keep one CPU busy, and
/// their 126 copies a poll fit the receiving veth's ring (256 frames; more are lost
/// before the receiver sees them).
const IN_LOOP: usize = 2;

/// Where the flood's sources are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sources {
    /// Random hosts of one /24 (10.1.1.0/24).
    OneNet,
    /// One host in each of 65,536 /24s (10.0.0.0/8), at random.
    ManyNets,
    /// Random /64s of 2001:db8::/32.
    V6Nets,
}

impl Sources {
    pub const ALL: [Sources; 3] = [Sources::OneNet, Sources::ManyNets, Sources::V6Nets];

    pub fn name(self) -> &'static str {
        match self {
            Sources::OneNet => "one /24",
            Sources::ManyNets => "65,536 /24s",
            Sources::V6Nets => "random IPv6 /64s",
        }
    }

    /// The generator's `FLOOD_CTL[1]`.
    fn code(self) -> u32 {
        match self {
            Sources::OneNet => 0,
            Sources::ManyNets => 1,
            Sources::V6Nets => 2,
        }
    }

    /// The frame the generator copies (valid checksums; each copy gets a new source).
    fn template(self) -> Vec<u8> {
        match self {
            Sources::V6Nets => ether(
                &[],
                ETH_IPV6,
                &ipv6_tcp(
                    [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
                    443,
                    SYN,
                    &[],
                ),
            ),
            _ => ether(&[], ETH_IPV4, &ipv4_tcp([10, 1, 1, 1], 443, SYN, &[])),
        }
    }
}

/// What receives the flood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `flood_drop`: XDP_DROP, nothing else.
    BareDrop,
    /// shaper's program with a `drop` rule per family.
    Shaper,
    /// nftables or iptables, set up by [`crate::netfilter`].
    Kernel(Limiter),
}

impl Filter {
    pub const ALL: [Filter; 4] = [
        Filter::BareDrop,
        Filter::Shaper,
        Filter::Kernel(Limiter::Nftables),
        Filter::Kernel(Limiter::Iptables),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Filter::BareDrop => "bare XDP drop",
            Filter::Shaper => "shaper (XDP, drop)",
            Filter::Kernel(l) => l.name(),
        }
    }
}

/// Every filter's quota per /24 and per /64: 1 SYN/s with a burst of 2 (a quota the
/// flood from 65,536 /24s exceeds at the rate this machine can take it in).
const RATE: u32 = 1;
const BURST: u32 = 2;

/// shaper's policy, with that quota.
const POLICY: &str = r#"
[defaults]
ipv4_group = 24
ipv6_group = 64

[[rule]]
name = "flood4"
prefix = "10.0.0.0/8"
rate = 1
burst = 2
action = "drop"

[[rule]]
name = "flood6"
prefix = "2001:db8::/32"
rate = 1
burst = 2
action = "drop"
"#;

/// One round: one filter, one source kind.
#[derive(Clone, Debug)]
pub struct Round {
    pub filter: Filter,
    pub sources: Sources,
    /// Frames the receiving CPU took from the veth.
    pub received: u64,
    /// Of those, what the filter counted as dropped.
    pub dropped: u64,
    /// ns of the receiving NAPI thread per frame received.
    pub ns_per_packet: f64,
    /// The generator's rate (frames it made per second of its run).
    pub generated_pps: f64,
}

/// The testbed: a namespace with the veths, the generator and the filters.
pub struct Bed {
    ns: Netns,
    generator: Ebpf,
    shaper: Harness,
}

impl Bed {
    pub fn new() -> Result<Bed> {
        crate::progrun::require_bpf();
        let ns = Netns::new("flood")?;
        for (a, b) in [(GEN_DEV, RX_DEV), (LOOP_TX, LOOP_RX)] {
            ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b])?;
        }
        ns.ip(&["link", "set", RX_DEV, "address", RX_MAC])?;
        ns.ip(&["addr", "add", "198.19.0.1/16", "dev", RX_DEV])?;
        ns.ip(&["addr", "add", "2001:db8::1/64", "dev", RX_DEV, "nodad"])?;
        for dev in [GEN_DEV, RX_DEV, LOOP_TX, LOOP_RX] {
            ns.ip(&["link", "set", dev, "up"])?;
        }
        // GRO gives a veth a NAPI poll without an XDP program (so frames redirected to
        // `r0` reach nftables and iptables), and a threaded one runs in a kernel thread
        // of its own, pinned to a CPU of its own.
        for dev in [RX_DEV, LOOP_RX] {
            ns.exec(&["ethtool", "-K", dev, "gro", "on"])?;
            ns.exec(&[
                "sh",
                "-c",
                &format!("echo 1 > /sys/class/net/{dev}/threaded"),
            ])?;
        }
        let (gen_if, loop_if) = ns.run_in(|| (ifindex(GEN_DEV), ifindex(LOOP_TX)))?;
        let (gen_if, loop_if) = (gen_if?, loop_if?);
        let mut generator = EbpfLoader::new()
            .load(shaper::BENCH_OBJECT)
            .context("loading the generator")?;
        for name in ["flood_src", "flood_fan", "flood_drop"] {
            xdp(&mut generator, name)?.load()?;
        }
        let src = xdp(&mut generator, "flood_src")?.fd()?.try_clone()?;
        let mut fan: DevMap<_> = DevMap::try_from(
            generator
                .map_mut("FAN")
                .ok_or_else(|| anyhow!("map FAN missing"))?,
        )?;
        // The kernel finds a devmap entry's interface in the caller's namespace.
        ns.run_in(|| -> Result<()> {
            for i in 0..FAN - 1 {
                fan.set(i, gen_if, Some(&src), 0)?;
            }
            fan.set(FAN - 1, loop_if, None, 0)?;
            Ok(())
        })??;
        let path = ns.path();
        let fan_prog = xdp(&mut generator, "flood_fan")?;
        // The link lives as long as the program (the namespace goes first).
        crate::netns::run_in_path(&path, || fan_prog.attach(LOOP_RX, XdpMode::Driver))?
            .map_err(|e| anyhow!("attaching the generator to {LOOP_RX}: {e}"))?;
        pin_thread(napi_thread(LOOP_RX)?, 0).context("pinning the generator's NAPI thread")?;
        let shaper = Harness::new(POLICY)?;
        Ok(Bed {
            ns,
            generator,
            shaper,
        })
    }

    /// Flood through `filter` from `sources`: about `frames` generated.
    pub fn round(&mut self, filter: Filter, sources: Sources, frames: u64) -> Result<Round> {
        let before = self.filter_dropped(filter)?;
        let attached = self.install(filter)?;
        let pid = napi_thread(RX_DEV)?;
        pin_thread(pid, 1).context("pinning the receiver's NAPI thread")?;
        let (rx0, cpu0) = (self.received()?, schedstat_ns(pid)?);
        let broadcasts = frames / u64::from(FAN - 1);
        let elapsed = self.generate(sources, broadcasts)?;
        // The ring the generator fills drains within microseconds.
        std::thread::sleep(Duration::from_millis(50));
        let (rx1, cpu1) = (self.received()?, schedstat_ns(pid)?);
        let dropped = self.filter_dropped(filter)? - before;
        self.uninstall(filter, attached)?;
        let received = rx1 - rx0;
        Ok(Round {
            filter,
            sources,
            received,
            dropped,
            ns_per_packet: (cpu1 - cpu0) as f64 / received.max(1) as f64,
            generated_pps: (broadcasts * u64::from(FAN - 1)) as f64 / elapsed.as_secs_f64(),
        })
    }

    /// Start the loop with `broadcasts` to make and wait until they are made; returns
    /// how long that took.
    fn generate(&mut self, sources: Sources, broadcasts: u64) -> Result<Duration> {
        let mut ctl: Array<_, u64> = Array::try_from(
            self.generator
                .map_mut("FLOOD_CTL")
                .ok_or_else(|| anyhow!("map FLOOD_CTL missing"))?,
        )?;
        ctl.set(1, u64::from(sources.code()), 0)?;
        ctl.set(0, broadcasts, 0)?;
        let t = std::time::Instant::now();
        let frame = sources.template();
        self.ns.run_in(|| -> Result<()> {
            let raw = Raw::new(LOOP_TX, [0; 6])?;
            for _ in 0..IN_LOOP {
                raw.send(&frame).context("injecting into the loop")?;
            }
            Ok(())
        })??;
        // Bounded: the loop makes tens of thousands of broadcasts a second.
        let deadline = t + Duration::from_secs(120);
        while ctl.get(&0, 0)? > 0 {
            if std::time::Instant::now() > deadline {
                ctl.set(0, 0, 0)?;
                bail!("the generator did not finish its {broadcasts} broadcasts in 120 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(t.elapsed())
    }

    /// Put `filter` in place on the receiving veth; returns what to undo.
    fn install(&mut self, filter: Filter) -> Result<Option<aya::programs::xdp::XdpLinkId>> {
        let path = self.ns.path();
        let attach = |p: &mut Xdp| {
            crate::netns::run_in_path(&path, || p.attach(RX_DEV, XdpMode::Driver))?
                .map_err(|e| anyhow!("attaching to {RX_DEV}: {e}"))
        };
        match filter {
            Filter::BareDrop => Ok(Some(attach(xdp(&mut self.generator, "flood_drop")?)?)),
            Filter::Shaper => Ok(Some(attach(self.shaper.dp.program()?)?)),
            Filter::Kernel(l) => {
                l.install(&self.ns, RX_DEV, RATE, BURST)?;
                Ok(None)
            }
        }
    }

    fn uninstall(
        &mut self,
        filter: Filter,
        link: Option<aya::programs::xdp::XdpLinkId>,
    ) -> Result<()> {
        match (filter, link) {
            (Filter::BareDrop, Some(l)) => xdp(&mut self.generator, "flood_drop")?.detach(l)?,
            (Filter::Shaper, Some(l)) => self.shaper.dp.program()?.detach(l)?,
            (Filter::Kernel(l), _) => l.remove(&self.ns)?,
            _ => bail!("{filter:?} was not installed"),
        }
        Ok(())
    }

    /// What `filter` has counted as dropped so far (cumulative; 0 where it is not
    /// installed).
    fn filter_dropped(&self, filter: Filter) -> Result<u64> {
        match filter {
            // Everything it receives.
            Filter::BareDrop => Ok(0),
            Filter::Shaper => {
                let dropped = shaper_common::Outcome::Dropped as usize;
                Ok(self.shaper.rule("flood4")?.counts[dropped]
                    + self.shaper.rule("flood6")?.counts[dropped])
            }
            Filter::Kernel(l) => Ok(l.dropped(&self.ns)),
        }
    }

    /// Frames the receiving veth has taken from its ring.
    fn received(&self) -> Result<u64> {
        let out = self.ns.output(&["ethtool", "-S", RX_DEV])?;
        stat(&out, "rx_queue_0_xdp_packets")
    }
}

/// The bare drop's dropped count is what it received.
pub fn dropped(r: &Round) -> u64 {
    if r.filter == Filter::BareDrop {
        r.received
    } else {
        r.dropped
    }
}

fn xdp<'a>(e: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    e.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing"))?
        .try_into()
        .map_err(|e| anyhow!("{name}: {e}"))
}

/// The NAPI thread of veth `dev` (`napi/DEV-ID`).
fn napi_thread(dev: &str) -> Result<u32> {
    let prefix = format!("napi/{dev}-");

    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim_end().starts_with(&prefix) {
            return Ok(pid);
        }
    }
    bail!("no NAPI thread for {dev} (threaded NAPI needs Linux 5.12 or later)")
}

/// A thread's run time so far (ns).
fn schedstat_ns(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))?;
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("/proc/{pid}/schedstat: {s}"))
}

/// `name: value` from `ethtool -S`.
fn stat(out: &str, name: &str) -> Result<u64> {
    out.lines()
        .find_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            (k == name).then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| anyhow!("ethtool -S has no {name}"))
}
