//! Running the host tools a disk image is built with (debootstrap, tar,
//! dpkg in a chroot, mkfs.ext4): each failure names the command and shows
//! the end of its output; long ones report their lines as progress. And
//! removing a build directory safely: nothing mounted below it survives,
//! and nothing mounted is deleted through.

use crate::ImageError;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Lines of a failed command's output shown in its error.
const TAIL_LINES: usize = 25;

fn cmd_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion, its stdout and stderr merged and handed to
/// `on_line` line by line.
pub(crate) fn run_lines(
    what: &str,
    mut cmd: Command,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let line = cmd_line(&cmd);
    let fail = |status: String, tail: &VecDeque<String>| ImageError::Tool {
        what: what.to_string(),
        cmd: line.clone(),
        status,
        tail: tail.iter().cloned().collect::<Vec<_>>().join("\n"),
    };
    let (reader, writer) = std::io::pipe()
        .map_err(|e| fail(format!("could not be started: {e}"), &VecDeque::new()))?;
    let writer2 = writer
        .try_clone()
        .map_err(|e| fail(format!("could not be started: {e}"), &VecDeque::new()))?;
    cmd.stdin(Stdio::null()).stdout(writer).stderr(writer2);
    let mut child = cmd.spawn().map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            " (is it installed? scripts/setup.sh installs what snowflock needs)"
        } else {
            ""
        };
        fail(format!("could not be started: {e}{hint}"), &VecDeque::new())
    })?;
    // The child holds the only write ends now: the read ends at its exit.
    drop(cmd);
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    for l in BufReader::new(reader).lines() {
        let Ok(l) = l else { break };
        on_line(&l);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(l);
    }
    let status = child
        .wait()
        .map_err(|e| fail(format!("could not be waited for: {e}"), &tail))?;
    if status.success() {
        Ok(())
    } else {
        Err(fail(format!("ended with {status}"), &tail))
    }
}

/// Runs `cmd` to completion; its output is shown only if it fails.
pub(crate) fn run(what: &str, cmd: Command) -> Result<(), ImageError> {
    run_lines(what, cmd, &mut |_| {})
}

/// Mount points at or below any of `roots` in a `/proc/self/mountinfo`
/// text (octal escapes as the kernel writes them undone), deepest first.
/// Shared with `snowflock cluster down`.
pub fn mounts_under(mountinfo: &str, roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape(m)))
        .filter(|m| roots.iter().any(|r| m.starts_with(r)))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    v.dedup();
    v
}

/// Mount points at or below `dir` now, deepest first.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts_under(&text, &[dir.to_path_buf()])
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes a build directory: unmounts whatever a tool left mounted below
/// it (debootstrap mounts `/proc` and `/sys` in its target, and a failed
/// run can leave them), then deletes it, but never while anything is still
/// mounted there.
pub(crate) fn remove_build_dir(dir: &Path) -> Result<(), ImageError> {
    if !dir.exists() {
        return Ok(());
    }
    for m in mounts_below(dir) {
        let mut c = Command::new("umount");
        c.arg("--lazy").arg(&m);
        let _ = run("Unmounting a build mount", c);
    }
    let left = mounts_below(dir);
    if !left.is_empty() {
        return Err(ImageError::Tool {
            what: format!("Removing {}", dir.display()),
            cmd: "umount".into(),
            status: "left file systems mounted".into(),
            tail: left
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        });
    }
    std::fs::remove_dir_all(dir).map_err(crate::error::io_err("remove", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_command_names_itself_and_shows_its_output() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo one; echo two >&2; exit 3"]);
        let mut seen = Vec::new();
        let e = run_lines("Testing", c, &mut |l| seen.push(l.to_string())).unwrap_err();
        assert_eq!(seen, ["one", "two"]);
        let msg = e.to_string();
        assert!(msg.starts_with("Testing failed: `sh -c echo one"), "{msg}");
        assert!(
            msg.contains("exit status: 3") && msg.ends_with("one\ntwo"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_tool_says_so() {
        let e = run("Testing", Command::new("/nonexistent/tool")).unwrap_err();
        assert!(e.to_string().contains("could not be started"), "{e}");
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }

    #[test]
    fn removes_a_directory_with_nothing_mounted() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path().join("build");
        std::fs::create_dir_all(b.join("x/y")).unwrap();
        remove_build_dir(&b).unwrap();
        assert!(!b.exists());
        remove_build_dir(&b).unwrap();
    }
}
