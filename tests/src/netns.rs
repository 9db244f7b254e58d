//! A testbed of network namespaces joined by veth pairs. Everything it creates has a
//! unique name and is removed on drop, even when a test panics. Nothing touches the
//! machine's own interfaces: all addresses are in 198.18.0.0/15 and 2001:db8::/32.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

/// Run `ip` with `args`; fail with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2: `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Create `shp-<pid>-<n>-<role>`.
    pub fn new(role: &str) -> Result<Netns> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "shp-{}-{}-{role}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n NAME args…`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// Set a sysctl inside the namespace (net.* only).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run_in(|| std::fs::write(&path, value).with_context(|| format!("sysctl {key}")))?
    }

    /// Run `f` on a thread that has entered this namespace (sockets it opens live here).
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        run_in_path(&self.path(), f)
    }

    /// Spawn a command inside this namespace (by setns before exec, so the host's bpffs
    /// stays visible, unlike `ip netns exec`).
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        spawn_in(&self.path(), cmd)
    }

    /// `ip netns exec NAME args…` (which mounts the namespace's own /sys); fails with
    /// the command's error output.
    pub fn exec(&self, args: &[&str]) -> Result<()> {
        self.command(args, None).map(|_| ())
    }

    /// Likewise, returning the command's output.
    pub fn output(&self, args: &[&str]) -> Result<String> {
        self.command(args, None)
    }

    /// Likewise, with `input` on the command's standard input.
    pub fn exec_stdin(&self, args: &[&str], input: &str) -> Result<()> {
        self.command(args, Some(input)).map(|_| ())
    }

    /// `ip netns exec NAME args…` with `input` (if any) on its standard input; its
    /// output, or an error with its error output.
    fn command(&self, args: &[&str], input: Option<&str>) -> Result<String> {
        use std::io::Write as _;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| args.join(" "))?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(anyhow!(
                "{}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Does `dev` in this namespace have an XDP program attached?
    pub fn has_xdp(&self, dev: &str) -> bool {
        has_xdp(&self.name, dev)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The capabilities the systemd unit leaves the daemon (its `CapabilityBoundingSet=`),
/// as `setpriv --bounding-set` takes them: `-all,+bpf,+net_admin,…`.
pub fn unit_bounding_set() -> Result<String> {
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/shaper.service");
    let text = std::fs::read_to_string(&unit).with_context(|| unit.display().to_string())?;
    let caps: Vec<String> = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .ok_or_else(|| anyhow!("{}: no CapabilityBoundingSet=", unit.display()))?
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    Ok(format!("-all,{}", caps.join(",")))
}

/// The index of interface `dev` in the calling thread's namespace.
pub fn ifindex(dev: &str) -> Result<u32> {
    let name = std::ffi::CString::new(dev)?;
    // SAFETY: a valid C string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => bail!("no interface {dev} in the namespace"),
        i => Ok(i),
    }
}

/// Spawn a command inside the namespace at `path` (by setns before exec, so the host's
/// bpffs stays visible, unlike `ip netns exec`).
pub fn spawn_in(path: &std::path::Path, cmd: &mut Command) -> Result<Child> {
    use std::os::unix::process::CommandExt as _;
    let file = File::open(path).context("opening the namespace")?;
    let fd = file.as_raw_fd();
    // SAFETY: setns is async-signal-safe; `file` outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("spawning in the namespace")?;
    drop(file);
    Ok(child)
}

/// Run `f` on a thread that has entered the namespace at `path`.
pub fn run_in_path<T: Send>(path: &std::path::Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            enter(path)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("thread in {} panicked", path.display()))?
    })
}

/// Move the calling thread into the namespace at `path`.
pub fn enter(path: &std::path::Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: a valid namespace fd; affects only this thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

/// Connect namespaces `a` and `b` with a veth pair named `a_dev` / `b_dev`, both up.
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<()> {
    ip(&[
        "link", "add", a_dev, "netns", &a.name, "type", "veth", "peer", "name", b_dev, "netns",
        &b.name,
    ])?;
    a.ip(&["link", "set", a_dev, "up"])?;
    b.ip(&["link", "set", b_dev, "up"])?;
    Ok(())
}

/// The `shaper` binary under test: `$SHAPER_BIN`, or the workspace's debug build.
pub fn shaper_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SHAPER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/shaper");
    if p.exists() {
        Ok(p)
    } else {
        bail!(
            "no shaper binary at {}; build it (`cargo build -p shaper`) or set SHAPER_BIN",
            p.display()
        )
    }
}

/// A `shaper run` daemon in a namespace, with its own pin root (on the host's bpffs) and
/// control socket. On drop: SIGTERM, then its pins are removed (which detaches the
/// program), so nothing outlives the test.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_root: PathBuf,
    /// The namespace and device, to restart and to wait for the attachment.
    ns_path: PathBuf,
    ns_name: String,
    dev: String,
    extra: Vec<String>,
    /// Environment variables for the daemon.
    pub env: Vec<(String, String)>,
    /// A command the daemon runs under (`setpriv …`), if any.
    pub wrapper: Vec<String>,
}

impl Daemon {
    /// Start `shaper run` on `dev` in `ns` with the policy text; wait until attached.
    pub fn start(ns: &Netns, dev: &str, policy: &str, extra: &[&str]) -> Result<Daemon> {
        Self::start_env(ns, dev, policy, extra, &[])
    }

    /// [`Daemon::start`] with environment variables.
    pub fn start_env(
        ns: &Netns,
        dev: &str,
        policy: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        Self::start_wrapped(ns, dev, policy, extra, env, &[])
    }

    /// [`Daemon::start_env`] under `wrapper` (a command that runs the daemon, e.g.
    /// `setpriv --bounding-set …`).
    pub fn start_wrapped(
        ns: &Netns,
        dev: &str,
        policy: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Result<Daemon> {
        let dir = std::env::temp_dir().join(format!("{}-{dev}", ns.name));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("shaper.toml");
        std::fs::write(&config, policy)?;
        let mut d = Daemon {
            child: Command::new("true").spawn()?,
            log: dir.join("shaper.log"),
            config,
            socket: dir.join("shaper.sock"),
            pin_root: PathBuf::from(format!("/sys/fs/bpf/shaper-test-{}", ns.name)),
            ns_path: ns.path(),
            ns_name: ns.name.clone(),
            dev: dev.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        };
        let _ = d.child.wait();
        d.spawn()?;
        Ok(d)
    }

    /// (Re)start the daemon process with the same arguments; wait until attached and its
    /// socket answers.
    pub fn spawn(&mut self) -> Result<()> {
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(shaper_bin()?);
                c
            }
            None => Command::new(shaper_bin()?),
        };
        cmd.args(["run", "--iface", &self.dev, "--config"])
            .arg(&self.config)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pin-root")
            .arg(&self.pin_root)
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)?,
            );
        self.child = spawn_in(&self.ns_path, &mut cmd).context("spawning shaper run")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("shaper run exited with {status}: {}", self.log_text());
            }
            if has_xdp(&self.ns_name, &self.dev)
                && std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "shaper run did not come up within 30 s: {}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The extra `shaper run` arguments of the next [`Daemon::spawn`].
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The pin directory of the daemon's interface.
    pub fn pin_dir(&self) -> PathBuf {
        self.pin_root.join(&self.dev)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM and wait (bounded); returns the exit status.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        if let Some(s) = self.child.try_wait()? {
            return Ok(s);
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("shaper run ignored SIGTERM for 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Remove the pins (detaching the program) and the pin root.
    pub fn remove_pins(&self) {
        let _ = shaper::pins::remove(&self.pin_dir());
        let _ = std::fs::remove_dir(&self.pin_root);
    }
}

/// Does `dev` in namespace `ns` have an XDP program attached?
pub fn has_xdp(ns: &str, dev: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "-d", "link", "show", "dev", dev])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("prog/xdp"))
        .unwrap_or(false)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.stop();
        }
        self.remove_pins();
        // Keep the log and config of a failing test for its report; tidy up otherwise.
        if !std::thread::panicking()
            && let Some(dir) = self.config.parent()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
