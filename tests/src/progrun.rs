//! The real program, loaded into the kernel, run on packets with BPF_PROG_TEST_RUN.

use anyhow::{Context as _, Result, anyhow};
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use shaper::{
    capacity::Capacity,
    dataplane::{Dataplane, Loader},
    policy::{self, Policy},
};
use shaper_common::maps::{BASELINE_PROGRAM_NAME, RuleStats};

/// XDP verdicts as the program returns them (`enum xdp_action`).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// Fail loudly if this process cannot use BPF: privileged tests never skip.
pub fn require_bpf() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the privileged tests need root (BPF, network namespaces); run them with `cargo xtask test` as root"
    );
}

/// A loaded program with a policy applied (through the daemon's own apply path: stable
/// rule ids, the same staging and switch).
pub struct Harness {
    pub dp: Dataplane,
    pub policy: Policy,
    /// Each rule's id, in the policy's order.
    pub ids: Vec<u32>,
}

impl Harness {
    /// Load the program and apply the policy text.
    pub fn new(policy_text: &str) -> Result<Harness> {
        Self::with_capacity(policy_text, Capacity::default())
    }

    pub fn with_capacity(policy_text: &str, capacity: Capacity) -> Result<Harness> {
        require_bpf();
        let policy = policy::parse("test.toml", policy_text).map_err(|e| anyhow!("{e}"))?;
        Self::from_policy(policy, capacity)
    }

    pub fn from_policy(policy: Policy, capacity: Capacity) -> Result<Harness> {
        let dp = Loader::new().capacity(capacity).load()?;
        let mut h = Harness {
            dp,
            policy: policy.clone(),
            ids: Vec::new(),
        };
        h.apply(&policy)?;
        Ok(h)
    }

    /// Switch to `policy` as the daemon does; returns each rule's id.
    pub fn apply(&mut self, policy: &Policy) -> Result<Vec<u32>> {
        let mut targets = [shaper::apply::Target {
            name: "test",
            dp: &mut self.dp,
        }];
        self.ids = shaper::apply::apply(&mut targets, policy)?;
        self.policy = policy.clone();
        Ok(self.ids.clone())
    }

    /// Run one packet through the program; returns the verdict and the output frame.
    pub fn run(&mut self, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_prog(self.dp.program()?, packet, 1).map(|(v, out, _)| (v, out))
    }

    /// Run a packet `repeat` times in the kernel; returns the verdict and ns per run.
    pub fn run_repeat(&mut self, packet: &[u8], repeat: u32) -> Result<(u32, f64)> {
        run_prog(self.dp.program()?, packet, repeat).map(|(v, _, ns)| (v, ns))
    }

    /// The rule id of the rule named `name`.
    pub fn rule_id(&self, name: &str) -> u32 {
        self.policy
            .rules
            .iter()
            .position(|r| r.name == name)
            .and_then(|i| self.ids.get(i).copied())
            .unwrap_or(u32::MAX)
    }

    pub fn rule(&self, name: &str) -> Result<RuleStats> {
        self.dp.rule_counters(self.rule_id(name))
    }

    pub fn global(&self) -> Result<Vec<u64>> {
        self.dp.global_counters()
    }

    /// The loaded program, shared: several threads may run it at once.
    pub fn xdp(&self) -> Result<&Xdp> {
        match self.dp.ebpf.program(shaper_common::maps::PROGRAM_NAME) {
            Some(aya::programs::Program::Xdp(p)) => Ok(p),
            _ => Err(anyhow!("program missing")),
        }
    }

    /// Keep the program in the kernel's XDP dispatcher while the returned namespace
    /// lives: attached (generic mode) to a veth of a namespace of its own, which carries
    /// no traffic. Otherwise every BPF_PROG_TEST_RUN puts the program into the
    /// dispatcher and takes it out again, each an RCU grace period (~8 ms here): a test
    /// that times a window of runs would find ~1% of it in runs and its ends in grace
    /// periods, in which a full bucket refills nothing.
    pub fn keep_in_dispatcher(&mut self) -> Result<crate::netns::Netns> {
        let ns = crate::netns::Netns::new("dispatch")?;
        ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])?;
        let p = self.dp.program()?;
        ns.run_in(|| p.attach("v0", aya::programs::xdp::XdpMode::Skb))?
            .context("attaching to the namespace's veth")?;
        Ok(ns)
    }

    /// Load the bare XDP_PASS baseline from the same object.
    pub fn baseline(&mut self) -> Result<&mut Xdp> {
        let prog: &mut Xdp = self
            .dp
            .ebpf
            .program_mut(BASELINE_PROGRAM_NAME)
            .ok_or_else(|| anyhow!("baseline program missing"))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load().context("loading the baseline program")?;
        }
        Ok(prog)
    }
}

/// Keep the calling thread on `cpu` (threads that must run on two CPUs at once).
pub fn pin_to_cpu(cpu: usize) {
    let _ = pin_thread(0, cpu);
}

/// Keep thread `tid` (0: the calling one) on `cpu`.
pub fn pin_thread(tid: u32, cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid as libc::pid_t, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// BPF_PROG_TEST_RUN on `prog`.
pub fn run_prog(prog: &Xdp, packet: &[u8], repeat: u32) -> Result<(u32, Vec<u8>, f64)> {
    let mut out = vec![0u8; packet.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    };
    let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    let n = r.data_size_out as usize;
    out.truncate(n);
    let ns = r.duration.as_nanos() as f64;
    Ok((r.return_value, out, ns))
}
