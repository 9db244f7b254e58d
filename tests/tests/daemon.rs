//! The daemon and the CLI against the real kernel in network namespaces: pinned state
//! that survives `kill -9`, adoption, SIGTERM leaving the program attached, the
//! root-only control socket, whole-or-nothing policy applies, reloads, and the CLI's
//! exit codes and JSON.

use std::{
    net::IpAddr,
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use shaper_tests::{
    netns::{Daemon, Netns, shaper_bin},
    prometheus::{self, Prometheus},
    tcp::{Bulk, Server, storm},
    testbed::{PORT, SERVER_DEV, SERVER_V4, Testbed, addr},
};

const RATE: f64 = 20.0;
const BURST: f64 = 10.0;

const POLICY: &str = r#"
[[rule]]
name = "pupils"
prefix = "198.18.0.0/16"
rate = 20
burst = 10
action = "drop"

[protect]
prefixes = ["198.18.250.1/32"]
"#;

fn shaper(args: &[&str]) -> Output {
    Command::new(shaper_bin().expect("shaper binary"))
        .args(args)
        .output()
        .expect("running shaper")
}

fn sock(d: &Daemon) -> String {
    d.socket.display().to_string()
}

fn json(d: &Daemon, what: &[&str]) -> serde_json::Value {
    let s = sock(d);
    let mut args = what.to_vec();
    args.extend_from_slice(&["-o", "json", "--socket", &s]);
    let out = shaper(&args);
    assert!(
        out.status.success(),
        "shaper {what:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn admitted(d: &Daemon) -> u64 {
    json(d, &["stats"])["rules"][0]["admitted"]
        .as_u64()
        .expect("admitted")
}

/// What `ip -d link` says of the server's device.
fn ip_link(ns: &Netns) -> String {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-d", "link", "show", "dev", SERVER_DEV])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Number of XDP programs the kernel reports on the server's device.
fn xdp_programs(ns: &Netns) -> usize {
    ip_link(ns).matches("prog/xdp").count()
}

/// The id of the XDP program the kernel runs on the server's device.
fn attached_prog_id(ns: &Netns) -> Option<u64> {
    ip_link(ns)
        .split_whitespace()
        .skip_while(|w| !w.starts_with("prog/xdp"))
        .nth(2)
        .and_then(|id| id.parse().ok())
}

/// A daemon, a server and a busy long-lived connection through it; and the program id.
fn busy(bed: &Testbed) -> (Daemon, Server, Bulk, Option<u64>) {
    let d = Daemon::start(&bed.srv, SERVER_DEV, POLICY, &[]).expect("shaper run");
    let server = Server::start(&bed.srv, &[Testbed::dst_for(addr(SERVER_V4))]).expect("server");
    let bulk = Bulk::start(&bed.cli, addr("198.18.250.1"), addr(SERVER_V4)).expect("bulk");
    let prog = json(&d, &["status"])["interfaces"][0]["prog_id"].as_u64();
    (d, server, bulk, prog)
}

fn bed() -> Testbed {
    shaper_tests::progrun::require_bpf();
    Testbed::new(&[addr("198.18.9.10"), addr("198.18.250.1")]).expect("testbed")
}

#[test]
fn kill_9_ten_times_during_a_storm_keeps_enforcing_and_adopts() {
    let bed = bed();
    let (mut d, server, bulk, first_prog) = busy(&bed);
    let src: IpAddr = addr("198.18.9.10");
    let t0 = Instant::now();
    let storm_secs = 14;
    std::thread::scope(|s| {
        let cli = &bed.cli;
        let h = s.spawn(move || {
            storm(
                cli,
                src,
                Testbed::dst_for(src),
                100,
                Duration::from_secs(storm_secs),
            )
        });
        let mut last = 0;
        let mut adoption = Duration::ZERO;
        for round in 0..10 {
            std::thread::sleep(Duration::from_millis(600));
            let before = admitted(&d);
            assert!(before >= last, "counters went back: {before} < {last}");
            d.kill().expect("kill -9");
            // Dead daemon: the program stays, exactly once, and keeps enforcing.
            assert_eq!(xdp_programs(&bed.srv), 1, "round {round}");
            std::thread::sleep(Duration::from_millis(300));
            let t = Instant::now();
            d.spawn().expect("restart");
            let took = t.elapsed();
            adoption = adoption.max(took);
            assert!(took < Duration::from_secs(2), "adoption took {took:?}");
            assert_eq!(
                xdp_programs(&bed.srv),
                1,
                "round {round}: one program after adoption"
            );
            let st = json(&d, &["status"]);
            assert_eq!(st["interfaces"][0]["adopted"], true, "round {round}");
            last = admitted(&d);
            assert!(last >= before, "counters must continue: {last} < {before}");
        }
        println!("slowest adoption: {adoption:?}");
        let storm = h.join().expect("storm thread").expect("storm");
        drop(storm);
    });
    let t = t0.elapsed().as_secs_f64();
    let accepted = server
        .accepted()
        .iter()
        .filter(|a| a.peer.ip() == src)
        .count() as f64;
    let bound = RATE * t + BURST;
    println!("accepted {accepted} in {t:.1} s (bound {bound:.1}) across 10 kill -9");
    assert!(
        accepted <= bound,
        "the limit must hold while the daemon is dead"
    );
    assert!(
        accepted >= RATE * storm_secs as f64 * 0.9,
        "the budget must keep serving: {accepted}"
    );
    let last_prog = json(&d, &["status"])["interfaces"][0]["prog_id"].as_u64();
    assert_ne!(first_prog, last_prog, "each adoption replaces the program");
    // The kernel runs the new program on the interface.
    assert_eq!(
        attached_prog_id(&bed.srv),
        last_prog,
        "{}",
        ip_link(&bed.srv)
    );
    // `shaper top` lists the stormed group (addresses belong there, not in metrics).
    let top = json(&d, &["top"]);
    let groups = top["groups"].as_array().expect("groups").clone();
    assert!(
        groups
            .iter()
            .any(|g| g["group"] == "198.18.9.0/24" && g["rule"] == "pupils"),
        "{top}"
    );
    let b = bulk.finish().expect("bulk");
    let seen = server.bulk();
    println!(
        "bulk during the kills: {} bytes, {} retransmissions, longest read gap {:?}",
        b.bytes, b.retransmits, seen.max_gap
    );
    assert!(!seen.corrupt);
    assert!(
        seen.max_gap < Duration::from_millis(500),
        "no stall across program replacements"
    );
}

#[test]
fn sigterm_leaves_the_program_attached_and_detach_removes_it() {
    let bed = bed();
    let mut d = Daemon::start(&bed.srv, SERVER_DEV, POLICY, &[]).expect("shaper run");
    let status = d.stop().expect("stop");
    assert!(status.success(), "{}", d.log_text());
    assert!(bed.srv.has_xdp(SERVER_DEV));
    assert!(d.pin_dir().join("link").exists());
    let root = d.pin_root.display().to_string();
    let out = shaper(&["detach", SERVER_DEV, "--pin-root", &root]);
    assert!(out.status.success(), "{out:?}");
    assert!(!bed.srv.has_xdp(SERVER_DEV));
    assert!(!d.pin_dir().exists());
    // Nothing left: detaching again says so and fails.
    let again = shaper(&["detach", SERVER_DEV, "--pin-root", &root]);
    assert!(!again.status.success());
}

/// The object's bare baseline program (another tool's, in these tests), loaded.
fn baseline(dp: &mut shaper::dataplane::Dataplane) -> &mut aya::programs::Xdp {
    let prog: &mut aya::programs::Xdp = dp
        .ebpf
        .program_mut(shaper_common::maps::BASELINE_PROGRAM_NAME)
        .expect("baseline")
        .try_into()
        .expect("xdp");
    prog.load().expect("load baseline");
    prog
}

/// The object's bare baseline program attached to the server's interface in `ns`,
/// as another tool would attach its own (through a link this process holds: keep the
/// returned value alive).
fn another_tools_program(ns: &Netns) -> shaper::dataplane::Dataplane {
    let mut other = shaper::dataplane::Dataplane::load().expect("load");
    let prog = baseline(&mut other);
    ns.run_in(|| prog.attach(SERVER_DEV, aya::programs::XdpMode::Skb))
        .expect("ns")
        .expect("attach the other program");
    other
}

/// The data plane's size is the operator's: a policy over the default limits is
/// refused before anything is loaded, naming the flag to raise; `policy check` takes
/// the same flags; raised, it loads; and a restart must ask what the pinned maps were
/// made with (else it is refused, saying how to keep or resize them).
#[test]
fn the_limits_size_the_maps_and_a_restart_asks_what_they_hold() {
    let bed = bed();
    let big: String = (0..5000)
        .map(|i| {
            format!(
                "[[rule]]\nname = \"s{i}\"\nprefix = \"10.{}.{}.0/24\"\nrate = 5\n",
                i / 256,
                i % 256
            )
        })
        .collect();
    let err = Daemon::start(&bed.srv, SERVER_DEV, &big, &[])
        .err()
        .expect("5,000 rules are over the default limit");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("5000 rules, the data plane holds 4096")
            && msg.contains("--max-rules")
            && msg.contains("nothing was loaded"),
        "{msg}"
    );
    assert!(!bed.srv.has_xdp(SERVER_DEV));
    let file = std::env::temp_dir().join(format!("{}-big.toml", bed.srv.name));
    std::fs::write(&file, &big).expect("write");
    let f = file.display().to_string();
    assert_eq!(shaper(&["policy", "check", &f]).status.code(), Some(1));
    let limits = ["--max-rules", "8192", "--max-prefixes", "16384"];
    let mut args = vec!["policy", "check", &f];
    args.extend_from_slice(&limits);
    let out = shaper(&args);
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{out:?}");
    let mut d = Daemon::start(&bed.srv, SERVER_DEV, &big, &limits).expect("raised limits");
    let stats = json(&d, &["stats"]);
    assert_eq!(stats["rules"].as_array().map(Vec::len), Some(5000));
    // Stopped (the program stays attached, its maps pinned), then started with the
    // default limits and a small policy: refused, nothing changed.
    d.stop().expect("SIGTERM");
    std::fs::write(&d.config, POLICY).expect("policy");
    d.set_extra(&[]);
    let msg = format!("{:#}", d.spawn().expect_err("the maps are larger"));
    assert!(
        msg.contains("where this start asks")
            && (msg.contains("--max-rules") || msg.contains("--max-prefixes"))
            && msg.contains("shaper detach"),
        "{msg}"
    );
    assert!(bed.srv.has_xdp(SERVER_DEV), "the program stays attached");
    // With the limits the maps were made with, it adopts them.
    d.set_extra(&limits);
    d.spawn().expect("the same limits");
    assert_eq!(json(&d, &["status"])["interfaces"][0]["adopted"], true);
}

#[test]
fn another_tools_program_is_refused_unless_replace() {
    let bed = bed();
    let _other = another_tools_program(&bed.srv);
    let err = Daemon::start(&bed.srv, SERVER_DEV, POLICY, &[])
        .err()
        .expect("must refuse");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("already has an XDP program") && msg.contains("program id"),
        "{msg}"
    );
    let d = Daemon::start(&bed.srv, SERVER_DEV, POLICY, &["--replace"]).expect("--replace");
    assert_eq!(xdp_programs(&bed.srv), 1);
    assert_eq!(json(&d, &["status"])["interfaces"][0]["adopted"], false);
}

#[test]
fn control_socket_refuses_non_root_and_survives_garbage() {
    use std::{io::Write as _, os::unix::fs::PermissionsExt as _};
    let bed = bed();
    let mut d = Daemon::start(&bed.srv, SERVER_DEV, POLICY, &[]).expect("shaper run");
    // Loosen the modes on purpose: the daemon must still refuse a non-root peer.
    let dir = d.socket.parent().expect("dir").to_path_buf();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let out = {
        use std::os::unix::process::CommandExt as _;
        Command::new(shaper_bin().expect("shaper"))
            .args(["status", "--socket", &sock(&d)])
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run as nobody")
    };
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");

    // Thousands of bad frames: random bytes, truncated frames, oversized lengths,
    // valid frames of junk JSON and of the wrong version.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0..3000 {
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&d.socket) else {
            panic!("daemon stopped accepting after {i} bad connections");
        };
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        let junk: Vec<u8> = (0..(next() % 64)).map(|_| next() as u8).collect();
        let frame = match i % 5 {
            0 => junk,
            1 => [&100u32.to_be_bytes()[..], &junk[..junk.len().min(10)]].concat(),
            2 => [&u32::MAX.to_be_bytes()[..], &junk[..]].concat(),
            3 => [&(junk.len() as u32).to_be_bytes()[..], &junk[..]].concat(),
            _ => {
                let body = br#"{"version":99,"body":{"request":"status"}}"#;
                [&(body.len() as u32).to_be_bytes()[..], &body[..]].concat()
            }
        };
        let _ = s.write_all(&frame);
        if i % 5 >= 3 {
            // A whole frame: the daemon answers with an error.
            let reply = shaper::protocol::read_frame(&mut s).expect("an error reply");
            let v: serde_json::Value = serde_json::from_slice(&reply).expect("json");
            assert_eq!(v["response"], "error", "{v}");
        }
    }
    assert!(d.child.try_wait().expect("wait").is_none(), "daemon died");
    let st = json(&d, &["status"]);
    assert_eq!(st["interfaces"][0]["iface"], SERVER_DEV);
}

/// Invalid policies: (text, line, col) of the first error.
fn invalid_corpus() -> Vec<(String, usize, usize)> {
    let rule = |body: &str| format!("[[rule]]\nname = \"r\"\n{body}\n");
    let mut v: Vec<(String, usize, usize)> = vec![
        (rule("prefix = \"10.0.0.1/8\"\nrate = 5"), 3, 10),
        (rule("prefix = \"10.0.0.0/33\"\nrate = 5"), 3, 10),
        (rule("prefix = \"010.0.0.0/8\"\nrate = 5"), 3, 10),
        (rule("prefix = \"10.0.0.0/8/8\"\nrate = 5"), 3, 10),
        (rule("prefix = \"2001:db8::1/32\"\nrate = 5"), 3, 10),
        (rule("prefix = \"2001:db8::/129\"\nrate = 5"), 3, 10),
        (rule("prefix = \"banana\"\nrate = 5"), 3, 10),
        (rule("prefix = \"10.0.0.0/8\"\nrate = -1"), 4, 8),
        (
            rule("prefix = \"10.0.0.0/8\"\nrate = \"5/fortnight\""),
            4,
            8,
        ),
        (rule("prefix = \"10.0.0.0/8\"\nrate = \"x/s\""), 4, 8),
        (rule("prefix = \"10.0.0.0/8\"\nrate = 5\nburst = -3"), 5, 9),
        (rule("prefix = \"10.0.0.0/8\"\nrate = 5\nburst = 0"), 5, 9),
        (rule("prefix = \"10.0.0.0/8\"\nrate = 5\ngroup = 7"), 5, 9),
        (rule("prefix = \"10.0.0.0/8\"\nrate = 5\ngroup = 33"), 5, 9),
        (
            rule("prefix = \"2001:db8::/32\"\nrate = 5\ngroup = 200"),
            5,
            9,
        ),
        (
            rule("prefix = \"10.0.0.0/8\"\nrate = 5\naction = \"reject\""),
            5,
            10,
        ),
        (
            rule("prefix = \"10.0.0.0/8\"\nrate = 5\nceiling = 0"),
            5,
            11,
        ),
        (
            rule("prefix = \"10.0.0.0/8\"\nrate = 5\nmax_wait = \"0s\""),
            5,
            12,
        ),
        (
            rule("prefix = \"10.0.0.0/8\"\nrate = 5\nmax_wait = \"30\""),
            5,
            12,
        ),
        (
            rule("prefix = \"10.0.0.0/8\"\nrate = 5\nmax_wait = \"1h\""),
            5,
            12,
        ),
        (
            rule("prefix = \"10.0.0.0/8\"\nrate = 5\nmax_waiting = 0"),
            5,
            15,
        ),
        (
            rule("prefix = \"10.0.0.0/8\"\nrate = 5\ncolour = \"red\""),
            5,
            1,
        ),
        (
            "[defaults]\nipv4_group = 40\n".to_string()
                + &rule("prefix = \"10.0.0.0/8\"\nrate = 5"),
            2,
            14,
        ),
        (
            "[defaults]\nipv6_group = 129\n".to_string()
                + &rule("prefix = \"10.0.0.0/8\"\nrate = 5"),
            2,
            14,
        ),
        (
            "[defaults]\nmax_wait = \"-5s\"\n".to_string()
                + &rule("prefix = \"10.0.0.0/8\"\nrate = 5"),
            2,
            12,
        ),
        ("[defaults]\nspeed = 1\n".to_string(), 2, 1),
        (
            "[protect]\nprefixes = [\"192.0.2.1/24\"]\n".to_string(),
            2,
            13,
        ),
        ("[protect]\nports = [70000]\n".to_string(), 2, 10),
        ("[protect]\nports = [-1]\n".to_string(), 2, 10),
        ("[protect]\nhosts = []\n".to_string(), 2, 1),
        (
            "[[rule]]\nprefix = \"10.0.0.0/8\"\nrate = 5\n".to_string(),
            1,
            1,
        ),
        ("[[rule]]\nname = \"r\"\nrate = 5\n".to_string(), 1, 1),
        (
            "[[rule]]\nname = \"r\"\nprefix = \"10.0.0.0/8\"\n".to_string(),
            1,
            1,
        ),
        ("[[rule\nname = \"r\"\n".to_string(), 1, 7),
        ("this is not toml\n".to_string(), 1, 6),
        (
            "[[rule]]\nname = 5\nprefix = \"10.0.0.0/8\"\nrate = 5\n".to_string(),
            2,
            8,
        ),
        (
            "[[rule]]\nname = \"r\"\nprefix = [1]\nrate = 5\n".to_string(),
            3,
            10,
        ),
    ];
    // Duplicates need two rules.
    v.push((
        rule("prefix = \"10.0.0.0/8\"\nrate = 5") + &rule("prefix = \"10.1.0.0/16\"\nrate = 5"),
        6,
        8,
    ));
    v.push((
        rule("prefix = \"10.0.0.0/8\"\nrate = 5")
            + "[[rule]]\nname = \"s\"\nprefix = \"10.0.0.0/8\"\nrate = 5\n",
        7,
        10,
    ));
    v.push((
        "[protect]\nprefixes = [\"192.0.2.1/32\", \"192.0.2.1/32\"]\n".to_string(),
        2,
        29,
    ));
    v
}

#[test]
fn policy_apply_is_whole_or_nothing_with_file_line_col_errors() {
    let bed = bed();
    let d = Daemon::start(&bed.srv, SERVER_DEV, POLICY, &[]).expect("shaper run");
    let s = sock(&d);
    let hash0 = json(&d, &["policy", "show"])["hash"].clone();
    let dir = d.config.parent().expect("dir").to_path_buf();
    let corpus = invalid_corpus();
    assert!(corpus.len() >= 40, "corpus has {}", corpus.len());
    let mut wrong_place = Vec::new();
    for (i, (text, line, col)) in corpus.iter().enumerate() {
        let f = dir.join(format!("bad{i}.toml"));
        std::fs::write(&f, text).expect("write");
        let fs = f.display().to_string();
        let check = shaper(&["policy", "check", &fs]);
        assert!(!check.status.success(), "bad{i} passed check:\n{text}");
        let out = shaper(&["policy", "apply", &fs, "--socket", &s]);
        assert!(!out.status.success(), "bad{i} applied:\n{text}");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let want = format!("{fs}:{line}:{col}:");
        if !err.contains(&want) {
            wrong_place.push(format!("bad{i}: want {want}, got {err}"));
        }
        assert_eq!(
            json(&d, &["policy", "show"])["hash"],
            hash0,
            "bad{i} changed the policy"
        );
    }
    assert!(wrong_place.is_empty(), "{}", wrong_place.join("\n"));

    // A good one applies; its generation and hash move.
    let good = dir.join("good.toml");
    std::fs::write(&good, POLICY.replace("rate = 20", "rate = 30")).expect("write");
    let out = shaper(&[
        "policy",
        "apply",
        &good.display().to_string(),
        "--socket",
        &s,
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["generation"], 2);
    let shown = json(&d, &["policy", "show"]);
    assert_ne!(shown["hash"], hash0);
    assert_eq!(shown["policy"]["rules"][0]["rate"]["count"], 30);

    // The lock-out guard: a policy limiting this SSH session is refused without --force.
    let ssh = "198.18.77.5 50000 198.19.0.1 2222";
    let out = Command::new(shaper_bin().expect("shaper"))
        .args([
            "policy",
            "apply",
            &good.display().to_string(),
            "--socket",
            &s,
        ])
        .env("SSH_CONNECTION", ssh)
        .output()
        .expect("apply");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SSH client 198.18.77.5"));
    let out = Command::new(shaper_bin().expect("shaper"))
        .args([
            "policy",
            "apply",
            &good.display().to_string(),
            "--socket",
            &s,
            "--force",
        ])
        .env("SSH_CONNECTION", ssh)
        .output()
        .expect("apply");
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn sighup_and_file_changes_reload_and_bad_files_keep_the_old_policy() {
    let bed = bed();
    // Stand in for systemd: what the daemon tells it (Type=notify).
    let notify_path = std::env::temp_dir().join(format!("shaper-notify-{}", std::process::id()));
    let _ = std::fs::remove_file(&notify_path);
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let told = || {
        let mut all = String::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = notify.recv(&mut buf) {
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
            all.push('\n');
        }
        all
    };
    let d = Daemon::start_env(
        &bed.srv,
        SERVER_DEV,
        POLICY,
        &[],
        &[("NOTIFY_SOCKET", &notify_path.display().to_string())],
    )
    .expect("shaper run");
    assert!(told().contains("READY=1"), "no READY=1");
    let wait_for = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if json(&d, &["policy", "show"])["hash"] == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    };
    // A changed file is picked up by itself.
    let v2 = POLICY.replace("rate = 20", "rate = 21");
    std::fs::write(&d.config, &v2).expect("write");
    assert!(
        wait_for(&shaper::protocol::policy_hash(&v2)),
        "file change not reloaded"
    );
    // A file the watcher must refuse: the old policy stays, and the log says why.
    let refused = |text: &str, log_says: &str| {
        std::fs::write(&d.config, text).expect("write");
        // (Read twice a second apart before it is applied, or refused.)
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(
            json(&d, &["policy", "show"])["hash"],
            shaper::protocol::policy_hash(&v2)
        );
        assert!(
            d.log_text().contains(log_says),
            "the log lacks {log_says:?}"
        );
    };
    // A bad file is refused, logged, and the old policy stays.
    refused("[[rule]]\nname = 1\n", "refused; the old policy stays");
    // ...and told to systemd, and to a client that asks for a reload: an error naming
    // the place, never a success.
    let said = told();
    assert!(
        said.contains("STATUS=reload (the config file changed) refused, the old policy stays: "),
        "{said}"
    );
    match shaper::client::call(&d.socket, shaper::protocol::Request::Reload) {
        Ok(shaper::protocol::Response::Error { message }) => {
            assert!(message.contains("shaper.toml:2:"), "{message}")
        }
        other => panic!("a refused reload answered {other:?}"),
    }
    // An empty file (an editor's truncation) is never applied: it would lift every
    // limit.
    let generation = || json(&d, &["policy", "show"])["generation"].as_u64();
    let before = generation();
    refused("", "the policy has no rules");
    // A file written in two halves (the first one a valid policy of its own) is
    // applied whole, once: a change is applied when it reads the same a second later.
    let v2b = POLICY.replace("rate = 20", "rate = 23");
    let half = &v2b[..v2b.find("[protect]").expect("protect section")];
    std::fs::write(&d.config, half).expect("write");
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&d.config, &v2b).expect("write");
    assert!(
        wait_for(&shaper::protocol::policy_hash(&v2b)),
        "the whole file was not applied"
    );
    assert_eq!(
        generation(),
        before.map(|g| g + 1),
        "the half file was applied"
    );
    // SIGHUP reloads too.
    let v3 = POLICY.replace("rate = 20", "rate = 22");
    std::fs::write(&d.config, &v3).expect("write");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    assert!(
        wait_for(&shaper::protocol::policy_hash(&v3)),
        "SIGHUP not reloaded"
    );
    assert!(
        told().contains("STATUS=enforcing policy generation"),
        "no status after a good reload"
    );
    let _ = std::fs::remove_file(&notify_path);
}

#[test]
fn cli_exit_codes_and_json() {
    let bed = bed();
    let d = Daemon::start(&bed.srv, SERVER_DEV, POLICY, &[]).expect("shaper run");
    let s = sock(&d);
    let st = json(&d, &["status"]);
    let i = &st["interfaces"][0];
    assert_eq!(i["iface"], SERVER_DEV);
    assert!(matches!(i["mode"].as_str(), Some("native" | "skb")), "{i}");
    assert!(i["prog_id"].as_u64().is_some_and(|p| p > 0));
    let maps: Vec<&str> = i["maps"]
        .as_array()
        .map(|m| m.iter().filter_map(|m| m["name"].as_str()).collect())
        .unwrap_or_default();
    for name in ["RULES_V4", "RULES_V6", "GROUPS", "WAITERS", "LINES"] {
        assert!(
            maps.contains(&name),
            "{name} missing from the fill levels: {i}"
        );
    }
    assert_eq!(st["generation"], 1);
    let stats = json(&d, &["stats"]);
    assert_eq!(stats["rules"][0]["name"], "pupils");
    assert_eq!(stats["rules"][0]["action"], "drop");
    assert!(stats["global"]["admitted"].is_u64());
    let shown = json(&d, &["policy", "show"]);
    assert_eq!(shown["source"], POLICY);
    // Human output works too.
    for what in [&["status"][..], &["stats"], &["policy", "show"]] {
        let mut a = what.to_vec();
        a.extend_from_slice(&["--socket", &s]);
        let out = shaper(&a);
        assert!(out.status.success(), "{what:?}: {out:?}");
        assert!(!out.stdout.is_empty());
    }
    // No daemon at the socket: a clear error and a failure exit.
    let out = shaper(&["status", "--socket", "/nonexistent/shaper.sock"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the daemon running?"));
    // Completions and the man page come from the clap definitions.
    let out = shaper(&["completions", "bash"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("shaper"));
    let out = shaper(&["man"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(".TH"));
    // policy set / rm edit one rule through the same validation and atomic switch.
    let out = shaper(&[
        "policy",
        "set",
        "lab",
        "--prefix",
        "198.18.40.0/24",
        "--rate",
        "5/s",
        "--burst",
        "7",
        "--action",
        "defer",
        "--socket",
        &s,
    ]);
    assert!(out.status.success(), "{out:?}");
    let shown = json(&d, &["policy", "show"]);
    let rules = shown["policy"]["rules"].as_array().expect("rules").clone();
    assert!(
        rules
            .iter()
            .any(|r| r["name"] == "lab" && r["action"] == "defer" && r["burst"] == 7)
    );
    assert_eq!(shown["generation"], 2);
    let out = shaper(&[
        "policy",
        "set",
        "lab",
        "--prefix",
        "198.18.40.1/24",
        "--rate",
        "5",
        "--socket",
        &s,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--prefix:") && err.contains("host bits"),
        "{err}"
    );
    assert_eq!(
        json(&d, &["policy", "show"])["generation"],
        2,
        "a bad set changes nothing"
    );
    // A set changes only the flags given, and says the file is not written.
    let out = shaper(&["policy", "set", "lab", "--rate", "9", "--socket", &s]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("live only: "),
        "{out:?}"
    );
    let shown = json(&d, &["policy", "show"]);
    let lab = shown["policy"]["rules"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "lab").cloned())
        .expect("lab");
    assert_eq!(
        (&lab["action"], &lab["burst"], &lab["prefix"]),
        (&"defer".into(), &7.into(), &"198.18.40.0/24".into()),
        "{lab}"
    );
    let out = shaper(&["policy", "rm", "lab", "--socket", &s]);
    assert!(out.status.success(), "{out:?}");
    let shown = json(&d, &["policy", "show"]);
    assert_eq!(shown["policy"]["rules"].as_array().map(Vec::len), Some(1));
    let out = shaper(&["policy", "rm", "lab", "--socket", &s]);
    assert!(!out.status.success(), "removing a missing rule fails");
    // Bad usage: clap's exit code 2.
    assert_eq!(shaper(&["stats", "-o", "yaml"]).status.code(), Some(2));
    let _ = Path::new(&s);
}

/// Two generations that each pass every SYN from 198.18.9.0/24 to port 8080, for
/// different reasons: A protects the port under a rule of rate 0, B allows the prefix
/// without protecting the port. A packet that saw A's rule with B's ports would be
/// dropped: the `dropped` counter stays 0 only if every packet sees one whole policy.
const GEN_A: &str = r#"
[[rule]]
name = "a"
prefix = "198.18.9.0/24"
rate = 0
burst = 0

[protect]
ports = [8080]
"#;

const GEN_B: &str = r#"
[[rule]]
name = "b"
prefix = "198.18.9.0/24"
rate = 1
action = "allow"
"#;

#[test]
fn a_hundred_applies_under_a_storm_never_mix_generations() {
    let bed = bed();
    let d = Daemon::start(&bed.srv, SERVER_DEV, GEN_A, &[]).expect("shaper run");
    let s = sock(&d);
    let server = Server::start(&bed.srv, &[Testbed::dst_for(addr(SERVER_V4))]).expect("server");
    let dir = d.config.parent().expect("dir").to_path_buf();
    let (fa, fb) = (dir.join("a.toml"), dir.join("b.toml"));
    std::fs::write(&fa, GEN_A).expect("write");
    std::fs::write(&fb, GEN_B).expect("write");
    let src = addr("198.18.9.10");
    let applied = std::thread::scope(|sc| {
        let cli = &bed.cli;
        let h = sc.spawn(move || {
            storm(
                cli,
                src,
                Testbed::dst_for(src),
                200,
                Duration::from_secs(12),
            )
        });
        let mut n = 0;
        for i in 0..100 {
            let f = if i % 2 == 0 { &fb } else { &fa };
            let out = shaper(&["policy", "apply", &f.display().to_string(), "--socket", &s]);
            assert!(out.status.success(), "apply {i}: {out:?}");
            n += 1;
        }
        let storm = h.join().expect("storm thread").expect("storm");
        std::thread::sleep(Duration::from_millis(500));
        (n, storm.sockets.len())
    });
    let stats = json(&d, &["stats"]);
    let g = &stats["global"];
    let passed = g["protected"].as_u64().unwrap_or(0) + g["admitted"].as_u64().unwrap_or(0);
    println!(
        "{} applies during {} attempts: protected {} admitted {} dropped {}; generation {}",
        applied.0,
        applied.1,
        g["protected"],
        g["admitted"],
        g["dropped"],
        json(&d, &["status"])["generation"]
    );
    assert_eq!(g["dropped"], 0, "a packet saw a mix of two generations");
    assert!(
        passed >= applied.1 as u64,
        "every attempt passed ({} attempts): {g}",
        applied.1
    );
    let accepted = server
        .accepted()
        .iter()
        .filter(|a| a.peer.ip() == src)
        .count();
    assert_eq!(
        accepted, applied.1,
        "every client connected at its first SYN"
    );
    assert_eq!(json(&d, &["status"])["generation"], 101);
}

#[test]
fn pinned_maps_of_another_layout_are_refused() {
    let bed = bed();
    // Pins made by a build with another group table size, in the daemon's pin directory.
    let root = std::path::PathBuf::from(format!("/sys/fs/bpf/shaper-test-{}", bed.srv.name));
    let dir = root.join(SERVER_DEV);
    let other = shaper::capacity::Capacity {
        groups: 1024,
        ..Default::default()
    };
    shaper::pins::ensure_root(&root).expect("bpffs");
    let dp = shaper::dataplane::Loader::new()
        .capacity(other)
        .pinned(&dir)
        .load()
        .expect("load with other sizes");
    drop(dp);
    let err = Daemon::start(&bed.srv, SERVER_DEV, POLICY, &[])
        .err()
        .expect("must refuse the pins");
    let msg = format!("{err:#}");
    let _ = shaper::pins::remove(&dir);
    let _ = std::fs::remove_dir(&root);
    // A size the start did not ask for: which flag sizes it, and how to keep or
    // resize the maps.
    assert!(
        msg.contains("GROUPS holds 1024 entries where this start asks 131072 (--max-groups"),
        "{msg}"
    );
    assert!(msg.contains("shaper detach"), "{msg}");
    assert!(!bed.srv.has_xdp(SERVER_DEV), "nothing attached");
}

#[test]
fn upgrade_to_another_build_on_the_pinned_link_loses_nothing() {
    let bed = bed();
    let (mut d, server, bulk, a) = busy(&bed);
    std::thread::sleep(Duration::from_millis(500));
    // The daemon stops (the program stays); build B, the same code with another build
    // number, takes the pinned link over while the connection keeps sending.
    assert!(d.stop().expect("stop").success());
    let pins = d.pin_dir();
    let mut b = shaper::dataplane::Loader::new()
        .pinned(&pins)
        .build(2)
        .load()
        .expect("load build B");
    let prog = b.program().expect("program");
    let att = bed
        .srv
        .run_in(|| {
            shaper::attach::attach_pinned(
                prog,
                SERVER_DEV,
                shaper::attach::Mode::Auto,
                &d.pin_dir(),
                false,
            )
        })
        .expect("ns")
        .expect("replace on the link");
    assert!(att.adopted, "build B must take the existing link over");
    assert_ne!(Some(u64::from(att.prog_id)), a);
    assert_eq!(xdp_programs(&bed.srv), 1);
    drop(b); // the link holds build B; the loader's handles go
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        attached_prog_id(&bed.srv),
        Some(u64::from(att.prog_id)),
        "build B must be the attached program: {}",
        ip_link(&bed.srv)
    );
    let r = bulk.finish().expect("bulk");
    let seen = server.bulk();
    println!(
        "upgrade A ({a:?}) → B ({}): {} bytes, {} retransmissions, longest read gap {:?}",
        att.prog_id, r.bytes, r.retransmits, seen.max_gap
    );
    assert!(!seen.corrupt);
    assert!(seen.max_gap < Duration::from_millis(500));
    assert_eq!(r.retransmits, 0, "no packet of the connection was lost");
}

#[test]
fn the_programs_log_records_reach_the_daemons_log() {
    let bed = bed();
    let policy = POLICY.replace("action = \"drop\"", "action = \"defer\"");
    let want = "a group of rule 0 is congested";
    // Off by default: debug records are skipped in the kernel.
    let run = |env: &[(&str, &str)]| -> String {
        let d = Daemon::start_env(&bed.srv, SERVER_DEV, &policy, &[], env).expect("shaper run");
        let _server =
            Server::start(&bed.srv, &[Testbed::dst_for(addr(SERVER_V4))]).expect("server");
        let src = addr("198.18.9.10");
        let s = storm(
            &bed.cli,
            src,
            Testbed::dst_for(src),
            100,
            Duration::from_secs(1),
        )
        .expect("storm");
        drop(s);
        let deadline = Instant::now() + Duration::from_secs(3);
        while !d.log_text().contains(want) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = d.log_text();
        drop(d);
        log
    };
    let quiet = run(&[]);
    assert!(!quiet.contains(want), "{quiet}");
    let verbose = run(&[("SHAPER_BPF_LOG", "debug")]);
    assert!(verbose.contains(want), "{verbose}");
}

/// Removes an interface's pins when dropped (the daemon's guard removes its first
/// interface's only).
struct PinGuard(std::path::PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = shaper::pins::remove(&self.0);
        // The pin root too, once the daemon's own interface has left it.
        if let Some(root) = self.0.parent() {
            let _ = std::fs::remove_dir(root);
        }
    }
}

#[test]
fn two_interfaces_with_different_histories_share_one_set_of_rule_ids() {
    let bed = bed();
    bed.srv
        .ip(&["link", "add", "s1", "type", "veth", "peer", "name", "s1p"])
        .expect("second interface");
    bed.srv.ip(&["link", "set", "s1", "up"]).expect("up");
    bed.srv.ip(&["link", "set", "s1p", "up"]).expect("up");
    // The second interface's pins hold another policy's history: its rule has id 0,
    // which a fresh first interface would give to `pupils`.
    let root = std::path::PathBuf::from(format!("/sys/fs/bpf/shaper-test-{}", bed.srv.name));
    shaper::pins::ensure_root(&root).expect("bpffs");
    let _pins = PinGuard(root.join("s1"));
    {
        let dir = root.join("s1");
        let mut dp = shaper::dataplane::Loader::new()
            .pinned(&dir)
            .load()
            .expect("load");
        let old = shaper::policy::parse(
            "old.toml",
            "[[rule]]\nname = \"old\"\nprefix = \"203.0.113.0/24\"\nrate = 1\n",
        )
        .expect("valid");
        let mut targets = [shaper::apply::Target {
            name: "s1",
            dp: &mut dp,
        }];
        let ids = shaper::apply::apply(&mut targets, &old).expect("apply");
        assert_eq!(ids, [0]);
    }
    let d = Daemon::start(&bed.srv, SERVER_DEV, POLICY, &["--iface", "s1"]).expect("shaper run");
    let st = json(&d, &["status"]);
    assert_eq!(st["interfaces"].as_array().map(Vec::len), Some(2), "{st}");
    let server = Server::start(&bed.srv, &[Testbed::dst_for(addr(SERVER_V4))]).expect("server");
    // Five attempts through the first interface, within the burst: all admitted, and
    // counted under `pupils` (its id the same on both interfaces).
    let src = addr("198.18.9.10");
    let s = storm(
        &bed.cli,
        src,
        Testbed::dst_for(src),
        5,
        Duration::from_secs(1),
    )
    .expect("storm");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(admitted(&d), 5, "{}", json(&d, &["stats"]));
    drop((s, server));
    // A new policy switches both interfaces; the rule keeps its id and its counters.
    let text =
        format!("{POLICY}\n[[rule]]\nname = \"lab\"\nprefix = \"198.18.20.0/24\"\nrate = 5\n");
    let file = std::env::temp_dir().join(format!("{}-two.toml", bed.srv.name));
    std::fs::write(&file, &text).expect("write");
    let s = sock(&d);
    let out = shaper(&[
        "policy",
        "apply",
        &file.display().to_string(),
        "--socket",
        &s,
    ]);
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(admitted(&d), 5);
}

/// GET /metrics from the daemon's default endpoint inside `ns`: the reply's head and
/// body.
fn scrape(ns: &Netns, accept: &str) -> (String, String) {
    shaper_tests::http::get(ns, 9101, "/metrics", accept).expect("scrape")
}

/// The value of the sample whose name and labels are `series`, e.g.
/// `shaper_syns_total{rule="pupils",outcome="admitted",interface="s0"}`.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

fn flood(bed: &Testbed, nets: Vec<[u8; 3]>, per_second: u32, dur: Duration) -> u64 {
    bed.flood(nets, per_second, dur).expect("flood")
}

/// An nftables table in `ns` with one counter of the SYNs to the server's port, on
/// `dev`'s `hook` (`egress`: what is sent; `ingress`: what the XDP program passed).
fn nft_syn_counter(ns: &Netns, hook: &str, dev: &str) {
    let rules = format!(
        "table netdev shaper_test {{ chain c {{ type filter hook {hook} device {dev} priority 0; \
         ip daddr {SERVER_V4} tcp dport {PORT} tcp flags & (syn | ack) == syn counter; }}; }}"
    );
    ns.exec_stdin(&["nft", "-f", "-"], &rules)
        .expect("nft (cargo xtask setup installs Debian's nftables)");
}

/// The packets the counter of [`nft_syn_counter`] in `ns` counted.
fn nft_count(ns: &Netns) -> u64 {
    let text = ns
        .output(&["nft", "list", "table", "netdev", "shaper_test"])
        .expect("nft list");
    text.split("packets ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {text}"))
}

/// A link's dropped count in `ns` (`tx` or `rx`), from `ip -s -j link`.
fn link_dropped(ns: &Netns, dev: &str, dir: &str) -> u64 {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-s", "-j", "link", "show", "dev", dev])
        .output()
        .expect("ip -s link");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    v[0]["stats64"][dir]["dropped"]
        .as_u64()
        .expect("dropped count")
}

/// Every raw SYN counted once, as nftables counts it: the SYNs a flood sends (a counter
/// on the sender's egress, less what the veth dropped on the way) are the rule's
/// `admitted` plus `dropped`, and what the XDP program passed (a counter on the
/// server's ingress, which runs after XDP) is its `admitted`; in `stats` and in
/// `/metrics` alike.
#[test]
fn counters_agree_with_nftables_packet_for_packet() {
    let bed = bed();
    let d = Daemon::start(&bed.srv, SERVER_DEV, POLICY, &[]).expect("shaper run");
    nft_syn_counter(&bed.cli, "egress", "c0");
    nft_syn_counter(&bed.srv, "ingress", SERVER_DEV);
    let sent = flood(
        &bed,
        vec![[198, 18, 30], [198, 18, 31], [198, 18, 32]],
        10_000,
        Duration::from_secs(2),
    );
    std::thread::sleep(Duration::from_millis(300));
    let lost = link_dropped(&bed.cli, "c0", "tx") + link_dropped(&bed.srv, SERVER_DEV, "rx");
    let (egress, ingress) = (nft_count(&bed.cli), nft_count(&bed.srv));
    let rule = &json(&d, &["stats"])["rules"][0];
    let count = |o: &str| rule[o].as_u64().unwrap_or_else(|| panic!("{o} in {rule}"));
    let (admitted, dropped) = (count("admitted"), count("dropped"));
    println!(
        "sent {sent}, nftables egress {egress}, lost on the veth {lost}, shaper admitted \
         {admitted} + dropped {dropped}, nftables ingress {ingress}"
    );
    assert!(sent >= 15_000, "the flood sent {sent}");
    assert_eq!(egress, sent);
    assert_eq!(admitted + dropped, egress - lost);
    assert_eq!(admitted, ingress);
    // Within the budget: 20/s and a burst of 10 per /24, three /24s, about 2 s.
    assert!((30..=200).contains(&admitted), "{admitted} admitted");
    let (_, body) = scrape(&bed.srv, "text/plain");
    for (outcome, n) in [("admitted", admitted), ("dropped", dropped)] {
        let series =
            format!("shaper_syns_total{{rule=\"pupils\",outcome=\"{outcome}\",interface=\"s0\"}}");
        assert_eq!(sample(&body, &series), Some(n), "{series}");
    }
}

/// The unit's hardening leaves the daemon five capabilities (`CapabilityBoundingSet=`)
/// and no new privileges. Started that way (by `setpriv`, as systemd would), it loads,
/// pins, attaches and enforces, and its `status` shows it has no others.
#[test]
fn the_daemon_enforces_with_only_the_units_capabilities() {
    let bed = bed();
    let caps = shaper_tests::netns::unit_bounding_set().expect("the unit's capabilities");
    let d = Daemon::start_wrapped(
        &bed.srv,
        SERVER_DEV,
        POLICY,
        &[],
        &[],
        &["setpriv", "--bounding-set", &caps, "--no-new-privs", "--"],
    )
    .expect("shaper run with the unit's capabilities");
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.child.id())).expect("status");
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .expect("CapBnd");
    // CAP_NET_ADMIN 12, CAP_SYS_ADMIN 21, CAP_SYS_RESOURCE 24, CAP_PERFMON 38, CAP_BPF
    // 39: none other (this machine's root may lack some of these itself).
    let unit: u64 = (1 << 12) | (1 << 21) | (1 << 24) | (1 << 38) | (1 << 39);
    let bounding = u64::from_str_radix(bounding.trim(), 16).expect("hex");
    assert_eq!(
        bounding & !unit,
        0,
        "the daemon's bounding set {bounding:#x} has more than the unit's ({caps})"
    );
    let sent = flood(&bed, vec![[198, 18, 50]], 5_000, Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(300));
    let rule = &json(&d, &["stats"])["rules"][0];
    let (admitted, dropped) = (
        rule["admitted"].as_u64().expect("admitted"),
        rule["dropped"].as_u64().expect("dropped"),
    );
    println!("with {caps}: sent {sent}, admitted {admitted}, dropped {dropped}");
    // 20/s and a burst of 10 for one /24, about 2 s.
    assert!((40..=60).contains(&admitted), "{admitted} admitted");
    assert!(dropped >= sent / 2, "{dropped} of {sent} dropped");
}

/// One node of a fleet enforces its share of every quota: the environment's
/// `SHAPER_FLEET_SHARE=1/4` (as the DaemonSet sets it) over the file's `[fleet] nodes =
/// 2`, then, restarted without it, the file's half. Measured with a flood from one /24
/// for 3 s against a rule of 40/s with a burst of 40: a quarter admits 10/s + 10, a half
/// 20/s + 20, the whole would be 160.
#[test]
fn a_fleet_share_scales_every_quota_end_to_end() {
    let bed = bed();
    let policy = "[fleet]\nnodes = 2\n\n[[rule]]\nname = \"pupils\"\nprefix = \"198.18.0.0/16\"\n\
                  group = 24\nrate = 40\nburst = 40\naction = \"drop\"\n";
    let mut d = Daemon::start_env(
        &bed.srv,
        SERVER_DEV,
        policy,
        &[],
        &[("SHAPER_FLEET_SHARE", "1/4")],
    )
    .expect("shaper run");
    let dur = Duration::from_secs(3);
    for (share, per_s, net) in [("1/4", 10.0, 41u8), ("1/2", 20.0, 42)] {
        let status = json(&d, &["status"]);
        assert_eq!(status["fleet_share"], share, "{status}");
        let before = admitted(&d);
        let t = Instant::now();
        let sent = flood(&bed, vec![[198, 18, net]], 2_000, dur);
        let secs = t.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(300));
        let got = (admitted(&d) - before) as f64;
        // The rule's budget at this share over the flood's time, with 10% for the
        // flood's own start and end.
        let want = per_s * dur.as_secs_f64() + per_s;
        println!("share {share}: sent {sent} in {secs:.2} s, admitted {got} (budget {want})");
        assert!(sent >= 4_000, "the flood sent {sent}");
        assert!(
            (want * 0.9..=per_s * secs + per_s).contains(&got),
            "share {share}: admitted {got}, want {want}"
        );
        // Restart without the environment: the file's `[fleet]` applies.
        d.stop().expect("stop");
        d.env.clear();
        d.spawn().expect("restart");
    }
}

/// A server, and `rate` attempts a second for `dur` from one pupil (198.18.9.10); 40 a
/// second is more than `POLICY` lets through.
fn pupils_storm(bed: &Testbed, rate: u32, dur: Duration) -> (Server, shaper_tests::tcp::Storm) {
    let server = Server::start(&bed.srv, &[Testbed::dst_for(addr(SERVER_V4))]).expect("server");
    let src = addr("198.18.9.10");
    let s = storm(&bed.cli, src, Testbed::dst_for(src), rate, dur).expect("storm");
    (server, s)
}

#[test]
fn metrics_agree_with_stats_and_pass_promtool() {
    let bed = bed();
    let d = Daemon::start(&bed.srv, SERVER_DEV, POLICY, &[]).expect("shaper run");
    // 40 attempts in a second against 20/s, burst 10: some admitted, some dropped.
    let (server, s) = pupils_storm(&bed, 40, Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(1500));
    // Closing the sockets stops their retransmissions: the counters are still after.
    drop((s, server));
    std::thread::sleep(Duration::from_millis(500));
    let stats = json(&d, &["stats"]);
    let (head, text) = scrape(&bed.srv, "text/plain");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    for o in shaper_common::Outcome::ALL {
        let series = format!(
            "shaper_syns_total{{rule=\"pupils\",outcome=\"{}\",interface=\"{SERVER_DEV}\"}}",
            o.name()
        );
        assert_eq!(
            sample(&text, &series),
            stats["rules"][0][o.name()].as_u64(),
            "{series}\n{text}"
        );
    }
    assert!(
        stats["rules"][0]["admitted"].as_u64() >= Some(10),
        "{stats}"
    );
    assert!(stats["rules"][0]["dropped"].as_u64() > Some(0), "{stats}");
    for (reason, n) in stats["global"].as_object().expect("global") {
        let series =
            format!("shaper_packets_total{{reason=\"{reason}\",interface=\"{SERVER_DEV}\"}}");
        assert_eq!(sample(&text, &series), n.as_u64(), "{series}");
    }
    assert_eq!(sample(&text, "shaper_up"), Some(1));
    assert_eq!(sample(&text, "shaper_policy_generation"), Some(1));
    // Only `defer` rules have a wait histogram; this policy has none.
    assert!(!text.contains("shaper_wait_seconds"), "{text}");
    assert!(
        text.contains("shaper_map_capacity{map=\"GROUPS\""),
        "{text}"
    );
    // Labels never carry addresses.
    assert!(!text.contains("198.18."), "{text}");
    // Every family has its help and type, and Prometheus's own checker finds nothing.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs Debian's prometheus package)");
    {
        use std::io::Write as _;
        let mut stdin = check.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write");
    }
    let out = check.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // OpenMetrics when the scraper asks for it.
    let (head, om) = scrape(&bed.srv, "application/openmetrics-text; version=1.0.0");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
    // A rule that goes takes its series with it.
    let file = d.config.parent().expect("dir").join("renamed.toml");
    std::fs::write(&file, POLICY.replace("\"pupils\"", "\"students\"")).expect("write");
    let out = shaper(&[
        "policy",
        "apply",
        &file.display().to_string(),
        "--socket",
        &sock(&d),
    ]);
    assert!(out.status.success(), "{out:?}");
    let (_, text) = scrape(&bed.srv, "text/plain");
    assert!(!text.contains("rule=\"pupils\""), "{text}");
    assert!(text.contains("rule=\"students\""), "{text}");
}

#[test]
fn a_real_prometheus_scrapes_the_daemon_and_every_alert_rule_evaluates() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/shaper.rules.yml");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool (cargo xtask setup installs Debian's prometheus package)");
    assert!(out.status.success(), "{out:?}");
    let bed = bed();
    let policy = format!(
        "{POLICY}\n[[rule]]\nname = \"lab\"\nprefix = \"198.18.20.0/24\"\nrate = 5\naction = \"defer\"\n"
    );
    let d = Daemon::start(&bed.srv, SERVER_DEV, &policy, &[]).expect("shaper run");
    let prom = Prometheus::start(&bed.srv, Some(&rules)).expect("prometheus");
    let promql = |q: &str| prom.query(q).ok();
    // Scraped before the storm, so that a rate sees it begin.
    prom.wait_scrapes(2, Duration::from_secs(60))
        .expect("Prometheus scrapes the daemon");
    let (server, s) = pupils_storm(&bed, 40, Duration::from_secs(2));
    // Until Prometheus has scraped the storm a few times and evaluated every rule.
    let deadline = Instant::now() + Duration::from_secs(60);
    let healthy = loop {
        let body = shaper_tests::http::get(&bed.srv, prometheus::PORT, "/api/v1/rules", "*/*")
            .map_or_else(|_| String::new(), |(_, b)| b);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let rules: Vec<serde_json::Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let scrapes = prom.scrapes();
        let seen_storm = promql("shaper_syns_total{rule=\"pupils\",outcome=\"admitted\"} > 0")
            .is_some_and(|r| !r.is_empty());
        if rules.len() == 6
            && rules.iter().all(|r| r["health"] == "ok")
            && scrapes >= 6
            && seen_storm
        {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape and evaluate in time: {rules:?} ({scrapes} scrapes)"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    drop((s, server));
    // A reload, so that its series exist too (the dashboard shows the last one).
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while promql("shaper_last_reload_success == 1").is_none_or(|r| r.is_empty()) {
        assert!(
            Instant::now() < deadline,
            "the reload never showed in Prometheus"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every query of the Grafana dashboard answers, with series.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/shaper.json"),
        )
        .expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 15, "{exprs:?}");
    for e in &exprs {
        let q = e
            .replace("$instance", ".*")
            .replace("$rule", ".*")
            .replace("$__rate_interval", "30s");
        let r = promql(&q).unwrap_or_else(|| panic!("the dashboard's {q} failed"));
        assert!(!r.is_empty(), "the dashboard's {q} has no series");
    }
    // Every alert rule evaluated without error; none fires (the storm may make the
    // drop-rate one pending: it waits 5 minutes), and a healthy daemon trips none of
    // the others.
    for r in &healthy {
        assert_ne!(r["state"], "firing", "{r}");
        if r["name"] != "ShaperRuleDropsMoreThanAdmits" {
            assert_eq!(r["state"], "inactive", "{r}");
        }
    }
    // The dashboard's and the alerts' building blocks answer with the series they
    // should.
    let admitted =
        promql("sum by (rule) (rate(shaper_syns_total{outcome=\"admitted\"}[30s]))").expect("rate");
    assert!(
        admitted.iter().any(|x| x["metric"]["rule"] == "pupils"
            && x["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()) > Some(0.0)),
        "{admitted:?}"
    );
    for (q, labels) in [
        (
            "histogram_quantile(0.99, sum by (rule, le) (rate(shaper_wait_seconds_bucket[30s])))",
            1,
        ),
        ("shaper_map_entries / shaper_map_capacity", 5),
        ("shaper_rule_max_wait_seconds", 1),
        ("shaper_attached == 1", 1),
        ("shaper_attach_info", 1),
        ("shaper_policy_generation", 1),
        ("shaper_packets_total{reason=\"not_attempt\"}", 1),
    ] {
        let r = promql(q).unwrap_or_else(|| panic!("{q} failed"));
        assert_eq!(r.len(), labels, "{q}: {r:?}");
    }
    drop(prom);
    drop(d);
}

#[test]
fn replace_takes_over_only_its_own_namespaces_interface() {
    // Two testbeds: their server interfaces have the same ifindex, each in its own
    // network namespace (ifindexes are per namespace).
    let (a, b) = (bed(), bed());
    let index = |bed: &Testbed| {
        bed.srv
            .run_in(|| shaper::attach::ifindex(SERVER_DEV).expect("ifindex"))
            .expect("ns")
    };
    assert_eq!(
        index(&a),
        index(&b),
        "the test needs the same ifindex in both"
    );
    let da = Daemon::start(&a.srv, SERVER_DEV, POLICY, &[]).expect("shaper run in A");
    let prog_a = attached_prog_id(&a.srv);
    // B's interface has another tool's program.
    let _other = another_tools_program(&b.srv);
    let db = Daemon::start(&b.srv, SERVER_DEV, POLICY, &["--replace"]).expect("--replace");
    // B took its own interface over; A's program is still the one on A's.
    assert_eq!(xdp_programs(&b.srv), 1);
    assert_eq!(
        attached_prog_id(&b.srv),
        json(&db, &["status"])["interfaces"][0]["prog_id"].as_u64()
    );
    assert!(prog_a.is_some());
    assert_eq!(attached_prog_id(&a.srv), prog_a, "A's program was detached");
    drop((da, db));
}

/// Removes a pinned object when dropped.
struct PinnedFile(std::path::PathBuf);

impl Drop for PinnedFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[test]
fn replace_switches_off_a_program_another_tool_attached_through_netlink() {
    let bed = bed();
    // Another tool's program, attached the old way (netlink, no link): iproute2 loads
    // it from a pin.
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/shaper-test-{}-other", bed.srv.name));
    shaper::pins::ensure_root(&dir).expect("bpffs");
    let pin = PinnedFile(dir.join("prog"));
    let mut other = shaper::dataplane::Dataplane::load().expect("load");
    baseline(&mut other).pin(&pin.0).expect("pin");
    // nsenter, not `ip -n`: that one remounts /sys, and the pin is on the host's bpffs.
    let out = Command::new("nsenter")
        .arg(format!("--net={}", bed.srv.path().display()))
        .args([
            "ip",
            "link",
            "set",
            "dev",
            SERVER_DEV,
            "xdpgeneric",
            "pinned",
        ])
        .arg(&pin.0)
        .output()
        .expect("nsenter");
    assert!(
        out.status.success(),
        "ip link set xdpgeneric pinned: {out:?}"
    );
    let other_id = attached_prog_id(&bed.srv);
    assert!(other_id.is_some(), "{}", ip_link(&bed.srv));
    let err = Daemon::start(&bed.srv, SERVER_DEV, POLICY, &[])
        .err()
        .expect("must refuse");
    let msg = format!("{err:#}");
    let id = other_id.unwrap_or_default();
    assert!(msg.contains(&format!("program id {id}")), "{msg}");
    // --replace switches it off over netlink and attaches shaper's own.
    let d = Daemon::start(&bed.srv, SERVER_DEV, POLICY, &["--replace"]).expect("--replace");
    assert_eq!(xdp_programs(&bed.srv), 1, "{}", ip_link(&bed.srv));
    assert_eq!(
        attached_prog_id(&bed.srv),
        json(&d, &["status"])["interfaces"][0]["prog_id"].as_u64()
    );
}

const DEFER: &str = r#"
[[rule]]
name = "pupils"
prefix = "198.18.0.0/16"
rate = "1/h"
burst = 2
action = "defer"
max_wait = "4s"

[protect]
prefixes = ["198.18.250.1/32"]
"#;

/// A tmux session running a command, killed when dropped.
struct Tmux(String);

impl Tmux {
    fn start(cmd: &str) -> Tmux {
        let name = format!("shaper-top-{}", std::process::id());
        let ok = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                &name,
                "-x",
                "200",
                "-y",
                "20",
                cmd,
            ])
            .status()
            .expect("tmux (cargo xtask setup installs it)");
        assert!(ok.success(), "tmux new-session");
        Tmux(name)
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.0])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn alive(&self) -> bool {
        Command::new("tmux")
            .args(["has-session", "-t", &self.0])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// `shaper top -o json` during a storm from 50 /24s, each sending more SYNs than the
/// one before: the groups come most limited first.
#[test]
fn top_lists_the_most_limited_groups_first() {
    let bed = bed();
    let d = Daemon::start(&bed.srv, SERVER_DEV, POLICY, &[]).expect("shaper run");
    // /24 number i appears i + 1 times in the flood's turn (in rounds: every /24 from
    // i on in round i, so a turn cut short still gives a larger i at least as many):
    // about 24·(i + 1) SYNs each, against 20/s and a burst of 10 per /24.
    let nets: Vec<[u8; 3]> = (0..50u8)
        .flat_map(|r| (r..50).map(|i| [198, 18, 100 + i]))
        .collect();
    let sent = flood(&bed, nets, 20_000, Duration::from_millis(1500));
    assert!(sent >= 25_000, "the flood sent {sent}");
    let s = sock(&d);
    let out = shaper(&["top", "-n", "50", "-o", "json", "--socket", &s]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let groups = v["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 50, "{v}");
    let order: Vec<String> = groups
        .iter()
        .map(|g| g["group"].as_str().unwrap_or_default().to_string())
        .collect();
    // All but the two smallest are over the budget, by 24 SYNs more each.
    let expected: Vec<String> = (2..50u8)
        .rev()
        .map(|i| format!("198.18.{}.0/24", 100 + i))
        .collect();
    assert_eq!(order[..48], expected[..], "{v}");
    let dropped: Vec<u64> = groups
        .iter()
        .filter_map(|g| g["dropped"].as_u64())
        .collect();
    assert!(dropped.windows(2).all(|w| w[0] >= w[1]), "{dropped:?}");
}

#[test]
fn the_line_shows_in_metrics_stats_and_a_live_top() {
    let bed = bed();
    let d = Daemon::start(&bed.srv, SERVER_DEV, DEFER, &[]).expect("shaper run");
    // Six clients in half a second: two take the burst, four prove themselves a second
    // later and wait in line (no budget for an hour).
    let started = Instant::now();
    let (server, clients) = pupils_storm(&bed, 12, Duration::from_millis(500));
    assert_eq!(clients.sockets.len(), 6);
    let s = sock(&d);
    let bin = shaper_bin().expect("shaper binary");
    let top = Tmux::start(&format!("{} top --rule pupils --socket {s}", bin.display()));
    std::thread::sleep(Duration::from_millis(2500));
    let series = |name: &str| format!("{name}{{rule=\"pupils\",interface=\"{SERVER_DEV}\"}}");
    let (_, text) = scrape(&bed.srv, "text/plain");
    assert_eq!(
        sample(&text, &series("shaper_line_waiting")),
        Some(4),
        "{text}"
    );
    let oldest: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(&series("shaper_line_oldest_wait_seconds"))?
                .trim()
                .parse()
                .ok()
        })
        .expect("oldest wait");
    assert!((1.5..4.0).contains(&oldest), "oldest wait {oldest}\n{text}");
    assert_eq!(
        sample(&text, &series("shaper_line_released_total")),
        Some(0)
    );
    let stats = json(&d, &["stats"]);
    assert_eq!(stats["rules"][0]["waiting"], 4, "{stats}");
    assert_eq!(stats["rules"][0]["admitted"], 2, "{stats}");
    // `top`: the group, its line and its SYNs (totals in JSON).
    let groups = json(&d, &["top", "--rule", "pupils"]);
    let g = &groups["groups"][0];
    assert_eq!(g["group"], "198.18.9.0/24", "{groups}");
    assert_eq!(g["waiting"], 4, "{groups}");
    assert_eq!(g["admitted"], 2, "{groups}");
    assert!(g["deferred"].as_u64() >= Some(8), "{groups}");
    assert!(
        json(&d, &["top", "--rule", "nobody"])["groups"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    // Not a terminal: one table, rates measured over the interval.
    let out = shaper(&[
        "top",
        "--rule",
        "pupils",
        "--interval",
        "0.5",
        "--socket",
        &s,
    ]);
    let plain = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        plain.starts_with("IFACE") && plain.contains("DEFERRED/S"),
        "{plain}"
    );
    assert!(plain.contains("198.18.9.0/24"), "{plain}");
    let out = shaper(&["top", "--interval", "0", "--socket", &s]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--interval"),
        "{out:?}"
    );
    // The live view, refreshed in place; `q` quits it.
    let screen = top.screen();
    assert!(screen.contains("1 groups (rule pupils)"), "{screen}");
    assert!(
        screen.contains("ADMITTED/S") && screen.contains("OLDEST WAIT"),
        "{screen}"
    );
    let row = screen
        .lines()
        .find(|l| l.contains("198.18.9.0/24"))
        .unwrap_or_else(|| panic!("no group row:\n{screen}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    // IFACE RULE GROUP ADMITTED/S DROPPED/S DEFERRED/S WAITING …: rates, not totals.
    assert_eq!(
        &cells[..3],
        [SERVER_DEV, "pupils", "198.18.9.0/24"],
        "{row}"
    );
    assert_eq!(cells[3], "0.0", "{row}");
    assert_eq!(cells[6], "4", "{row}");
    Command::new("tmux")
        .args(["send-keys", "-t", &top.0, "q"])
        .status()
        .expect("tmux send-keys");
    let quit = Instant::now();
    while top.alive() && quit.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!top.alive(), "top did not quit on q");
    // The four give up; once their `max_wait` has passed, their places are released.
    drop(clients);
    let wait = Duration::from_millis(500 + 4000 + 1000).saturating_sub(started.elapsed());
    std::thread::sleep(wait);
    let (_, text) = scrape(&bed.srv, "text/plain");
    assert_eq!(
        sample(&text, &series("shaper_line_waiting")),
        Some(0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &series("shaper_line_released_total")),
        Some(4),
        "{text}"
    );
    assert_eq!(json(&d, &["stats"])["rules"][0]["released"], 4);
    drop(server);
}
