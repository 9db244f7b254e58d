//! What ships beside the binary: the systemd unit passes `systemd-analyze verify` with
//! no warning at all (a split `Environment=` assignment, a missing binary or man page,
//! a discouraged setting would each print one).

use std::process::Command;

use shaper_tests::netns::shaper_bin;

#[test]
fn the_unit_file_verifies_without_a_warning() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit = std::fs::read_to_string(root.join("packaging/shaper.service")).expect("unit");
    assert!(
        unit.contains("ExecStart=/usr/local/bin/shaper run"),
        "the unit runs the installed binary"
    );
    // systemd.kill(5) discourages it; the program stays attached through its pinned
    // link whatever systemd kills.
    assert!(
        !unit.contains("KillMode=process"),
        "KillMode=process is discouraged"
    );
    let bin = shaper_bin().expect("shaper binary");
    let dir = std::env::temp_dir().join(format!("shaper-unit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("man/man1")).expect("scratch dir");
    // Installed as the README says: the binary where ExecStart looks, its man page
    // where `man` finds it (here: this binary, and MANPATH).
    let man = Command::new(&bin).arg("man").output().expect("shaper man");
    assert!(man.status.success(), "shaper man failed");
    std::fs::write(dir.join("man/man1/shaper.1"), &man.stdout).expect("man page");
    let unit = unit.replace("/usr/local/bin/shaper", &bin.display().to_string());
    let path = dir.join("shaper.service");
    std::fs::write(&path, unit).expect("unit copy");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("MANPATH", dir.join("man"))
        .output()
        .expect("systemd-analyze (Debian's systemd package; `cargo xtask setup` installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

/// `systemd-analyze security` rates the unit's sandbox (capabilities, system calls,
/// file system, namespaces) from the file alone; 2.5 or better is "OK". The daemon runs
/// under the unit's capabilities in the daemon tests (`the_daemon_enforces_with_only_the_units_capabilities`).
#[test]
fn the_unit_is_hardened_to_an_exposure_of_2_5_or_better() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(root.join("packaging/shaper.service"))
        .output()
        .expect("systemd-analyze (Debian's systemd package; `cargo xtask setup` installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for shaper.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    println!("systemd-analyze security: exposure {exposure}");
    assert!(exposure <= 2.5, "exposure {exposure} > 2.5:\n{text}");
}

/// deploy/kubernetes/: every manifest the kustomization lists, and only those, passes
/// the Kubernetes 1.31 schemas (strict: an unknown field is an error), and a manifest
/// with a misspelt field fails them (the check can fail). The DaemonSet keeps the unit's
/// capabilities, not a privileged container.
#[test]
fn the_kubernetes_manifests_validate_against_the_schemas() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let kustomization =
        std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization");
    let listed: Vec<String> = kustomization
        .lines()
        .skip_while(|l| !l.starts_with("resources:"))
        .skip(1)
        .take_while(|l| l.starts_with("  - "))
        .map(|l| l.trim_start_matches("  - ").trim().to_string())
        .collect();
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    present.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, present, "the kustomization lists every manifest");
    let validate = |files: &[std::path::PathBuf]| {
        Command::new("kubernetes-validate")
            .args(["--strict", "-k", "1.31.0"])
            .args(files)
            .output()
            .expect("kubernetes-validate (PyPI; `cargo xtask setup` installs it)")
    };
    let files: Vec<_> = listed.iter().map(|f| dir.join(f)).collect();
    let out = validate(&files);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    println!("{said}");
    assert!(out.status.success(), "kubernetes-validate: {said}");
    assert_eq!(said.matches(" passed for resource ").count(), 5, "{said}");
    let daemonset = std::fs::read_to_string(dir.join("daemonset.yaml")).expect("daemonset");
    let broken = std::env::temp_dir().join(format!("shaper-ds-{}.yaml", std::process::id()));
    std::fs::write(&broken, daemonset.replace("hostNetwork:", "hostNetwrk:")).expect("copy");
    let out = validate(std::slice::from_ref(&broken));
    let _ = std::fs::remove_file(&broken);
    assert!(
        !out.status.success(),
        "a misspelt field passed the schema check"
    );
    // The unit's capabilities, by the container's names.
    let caps = shaper_tests::netns::unit_bounding_set().expect("unit");
    let want: Vec<String> = caps
        .split(',')
        .skip(1)
        .map(|c| format!("\"{}\"", c.trim_start_matches('+').to_uppercase()))
        .collect();
    let add = daemonset
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: ["))
        .expect("capabilities add");
    assert_eq!(add.trim_end_matches(']'), want.join(", "));
    assert!(daemonset.contains("privileged: false"));
}

#[test]
fn every_man_page_the_pages_name_is_written() {
    let bin = shaper_bin().expect("shaper binary");
    let dir = std::env::temp_dir().join(format!("shaper-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ok = Command::new(&bin)
        .args(["man", "--dir"])
        .arg(&dir)
        .status()
        .expect("shaper man --dir");
    assert!(ok.success(), "shaper man --dir failed");
    let mut pages: Vec<String> = std::fs::read_dir(&dir)
        .expect("pages")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    pages.sort();
    assert!(pages.contains(&"shaper.1".to_string()), "{pages:?}");
    assert!(
        pages.contains(&"shaper-policy-apply.1".to_string()),
        "{pages:?}"
    );
    // Every page another page points at (roff escapes the dash) exists.
    for p in &pages {
        let text = std::fs::read_to_string(dir.join(p)).expect("page");
        for name in text
            .split_whitespace()
            .filter_map(|w| w.strip_suffix("(1)"))
        {
            let file = format!("{}.1", name.replace("\\-", "-"));
            assert!(
                pages.contains(&file),
                "{p} names {name}(1), which was not written"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
