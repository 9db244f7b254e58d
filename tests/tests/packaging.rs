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
