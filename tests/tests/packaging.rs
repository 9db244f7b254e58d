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
