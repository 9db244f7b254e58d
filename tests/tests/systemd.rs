//! The packaged, hardened unit under a real systemd. A Debian 12 root with the package
//! installed (`cargo xtask package --check` makes it: debootstrap with systemd, then
//! `dpkg -i`) is booted with `systemd-nspawn --boot` inside the testbed's server
//! namespace. There the unit's own systemd starts shaper on the server's veth, with
//! every hardening setting of the unit in force (capabilities, the system call filter,
//! the read-only file system but bpffs, `Type=notify`). The test checks that it
//! enforces, reloads, and keeps protecting while systemd restarts it after a crash.
//!
//! It needs that root (`SHAPER_DEB_ROOT`), so it is not part of `cargo xtask test`:
//! `cargo xtask package --check` runs it (and CI runs that).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use shaper_tests::{
    netns::Netns,
    testbed::{SERVER_DEV, Testbed},
};

/// Where the daemon pins, on the host's bpffs (the container shares it): a root of
/// this test's own.
const PIN_ROOT: &str = "/sys/fs/bpf/shaper-systemd-test";

/// A booted container: its `systemd-nspawn` process, and its PID 1 (seen from here).
struct Container {
    nspawn: Child,
    init: u32,
}

impl Container {
    /// Boot `root` in the network namespace `ns` (its interfaces are the container's).
    fn boot(root: &Path, ns: &Netns) -> Container {
        let nspawn = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .args(["systemd-nspawn", "--boot", "--register=no", "--keep-unit"])
            .args(["--capability=all", "--system-call-filter=bpf"])
            .args(["--bind=/sys/fs/bpf", "--console=passive", "-D"])
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-nspawn (Debian's systemd-container; the package check installs it)");
        let deadline = Instant::now() + Duration::from_secs(30);
        let init = loop {
            // The container's systemd: a process named `systemd` whose parent is nspawn.
            let found = std::fs::read_dir("/proc")
                .expect("/proc")
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .find(|pid| {
                    let stat =
                        std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    let ppid = stat
                        .rsplit(')')
                        .next()
                        .and_then(|r| r.split_whitespace().nth(1));
                    stat.contains("(systemd)") && ppid == Some(&nspawn.id().to_string())
                });
            if let Some(pid) = found {
                break pid;
            }
            assert!(
                Instant::now() < deadline,
                "the container's systemd did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        Container { nspawn, init }
    }

    /// Run `args` inside the container; its output.
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("nsenter")
            .args(["--target", &self.init.to_string(), "--all"])
            .args(args)
            .output()
            .expect("nsenter");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// Wait until `systemctl is-active shaper` says `want`.
    fn wait_active(&self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = self.run(&["systemctl", "is-active", "shaper"]);
            if state.trim() == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "shaper.service is {state}, not {want}:\n{}",
                self.run(&["journalctl", "-u", "shaper", "--no-pager"])
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn json(&self, what: &[&str]) -> serde_json::Value {
        let mut args = vec!["shaper"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["-o", "json"]);
        let out = self.run(&args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("shaper {what:?}: {e}: {out}"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // The pins are on the host's bpffs: remove them (and the program) first.
        self.run(&["shaper", "detach", "--pin-root", PIN_ROOT, SERVER_DEV]);
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let _ = std::fs::remove_dir(PIN_ROOT);
    }
}

fn policy(rate: u32) -> String {
    format!(
        "[[rule]]\nname = \"pupils\"\nprefix = \"198.18.0.0/16\"\ngroup = 24\nrate = {rate}\n\
         burst = 10\naction = \"drop\"\n\n[[rule]]\nname = \"v6\"\nprefix = \"::/0\"\nrate = 20\n"
    )
}

#[test]
#[ignore = "needs a Debian root with the package installed: `cargo xtask package --check` runs it"]
fn the_hardened_unit_loads_attaches_and_enforces_under_systemd() {
    let root = PathBuf::from(
        std::env::var("SHAPER_DEB_ROOT").expect("SHAPER_DEB_ROOT: a root with the package"),
    );
    let bed = Testbed::new(&[]).expect("testbed");
    // The operator's first steps (docs/install.md): name the interface, write the
    // policy, enable the unit.
    std::fs::write(
        root.join("etc/default/shaper"),
        format!("SHAPER_ARGS=\"--iface {SERVER_DEV} --pin-root {PIN_ROOT}\"\n"),
    )
    .expect("environment file");
    std::fs::write(root.join("etc/shaper/shaper.toml"), policy(20)).expect("policy");
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).expect("wants");
    let _ = std::fs::remove_file(wants.join("shaper.service"));
    std::os::unix::fs::symlink(
        "/lib/systemd/system/shaper.service",
        wants.join("shaper.service"),
    )
    .expect("enable");
    let c = Container::boot(&root, &bed.srv);
    // Type=notify: active means the daemon said READY=1, i.e. it enforces.
    c.wait_active("active");
    assert!(
        bed.srv.has_xdp(SERVER_DEV),
        "no XDP program on {SERVER_DEV}"
    );
    let status = c.json(&["status"]);
    println!("under systemd: {status}");

    // It enforces: 20/s and a burst of 10 for one /24, about 2 s.
    let sent = bed
        .flood(vec![[198, 18, 70]], 5_000, Duration::from_secs(2))
        .expect("flood");
    std::thread::sleep(Duration::from_millis(300));
    let rule = &c.json(&["stats"])["rules"][0];
    let (admitted, dropped) = (
        rule["admitted"].as_u64().expect("admitted"),
        rule["dropped"].as_u64().expect("dropped"),
    );
    println!("sent {sent}: admitted {admitted}, dropped {dropped}");
    assert!((40..=60).contains(&admitted), "{admitted} admitted");
    assert!(dropped >= sent / 2, "{dropped} of {sent} dropped");

    // `systemctl reload` (ExecReload) applies an edited policy.
    std::fs::write(root.join("etc/shaper/shaper.toml"), policy(40)).expect("policy");
    c.run(&["systemctl", "reload", "shaper"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.json(&["status"])["generation"].as_u64() != Some(2) {
        assert!(Instant::now() < deadline, "the reload was not applied");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A crash: the program stays attached, and systemd restarts the daemon, which
    // adopts the pinned link.
    let pid = c.run(&["systemctl", "show", "-p", "MainPID", "--value", "shaper"]);
    c.run(&["systemctl", "kill", "--signal=KILL", "shaper"]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(bed.srv.has_xdp(SERVER_DEV), "a crash detached the program");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = c.run(&["systemctl", "show", "-p", "MainPID", "--value", "shaper"]);
        if now.trim() != pid.trim() && now.trim() != "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "systemd did not restart the daemon"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.wait_active("active");
    let status = c.json(&["status"]);
    assert_eq!(status["interfaces"][0]["adopted"], true, "{status}");
}
