//! `import snowflock` inside a real guest. The default image carries the
//! module but no interpreter; this test adds the host's Debian Python to a
//! test image (binary, its libraries, a trimmed standard library).

use snowflock_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const SCRIPT: &str = r#"
import sys
sys.path.insert(0, "/usr/lib/python3")
import snowflock
t, g = snowflock.request_ticket(2)
cid = snowflock.clone(t)
if cid != 0:
    snowflock.exit(cid + 20)
kids = snowflock.join(t)
print("granted", g)
for k in sorted(kids, key=lambda k: k["clone_id"]):
    print("child", k["clone_id"], k["state"], k.get("code"))
try:
    snowflock.clone(t)
except snowflock.Error as e:
    print("error", e.code)
print("id", snowflock.id()["clone_id"])
"#;

/// The interpreter, its shared libraries and a trimmed copy of its stdlib,
/// as (source, destination) pairs for `image build --add`.
fn python_files(tmp: &Path) -> Option<Vec<(PathBuf, String)>> {
    let exe = std::fs::canonicalize("/usr/bin/python3").ok()?;
    let out = Command::new(&exe)
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
        ])
        .output()
        .ok()?;
    let stdlib = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let copy = tmp.join("stdlib");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&stdlib)
        .arg(&copy)
        .status()
        .ok()?;
    assert!(st.success());
    for big in [
        "test",
        "idlelib",
        "tkinter",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "turtledemo",
        "sqlite3",
        "distutils",
    ] {
        let _ = std::fs::remove_dir_all(copy.join(big));
    }
    let _ = Command::new("find")
        .arg(&copy)
        .args([
            "-name",
            "__pycache__",
            "-prune",
            "-exec",
            "rm",
            "-rf",
            "{}",
            "+",
        ])
        .status();
    let mut files = vec![
        (exe.clone(), exe.display().to_string()),
        (exe.clone(), "/usr/bin/python3".to_string()),
    ];
    files.push((copy, stdlib.display().to_string()));
    let ldd = Command::new("ldd").arg(&exe).output().ok()?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        if let Some(path) = line
            .split("=>")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
        {
            if path.starts_with('/') {
                let real = std::fs::canonicalize(path).ok()?;
                files.push((real, path.to_string()));
            }
        }
    }
    Some(files)
}

#[test]
fn python_module_in_a_guest() {
    if !vm_prereqs() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(files) = python_files(tmp.path()) else {
        // `scripts/setup.sh` installs Debian's python3, so CI always has it.
        assert_ne!(
            std::env::var("SNOWFLOCK_REQUIRE_VM").as_deref(),
            Ok("1"),
            "no /usr/bin/python3 to put in the image"
        );
        eprintln!("SKIPPED: no /usr/bin/python3");
        return;
    };
    let extra: Vec<(&Path, &str)> = files
        .iter()
        .map(|(s, d)| (s.as_path(), d.as_str()))
        .collect();
    let img = TestImage::build(&extra);
    let h = Host::start("h0");
    h.start_vm("p", &img, "384M");
    let out = h.sh_ok("p", &format!("python3 -c '{}'", SCRIPT.replace('\'', "\"")));
    assert!(out.contains("granted 2"), "{out}");
    assert!(
        out.contains("child 1 exited 21") && out.contains("child 2 exited 22"),
        "{out}"
    );
    assert!(out.contains("error ticket_discarded"), "{out}");
    assert!(out.contains("id 0"), "{out}");
}
