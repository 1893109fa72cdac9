//! busybox-static: the applets it provides, each of which becomes a
//! symlink in the image.

use crate::ImageError;
use std::path::Path;
use std::process::Command;

/// The applets `busybox --list-full` names, as absolute image paths.
pub(crate) fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let fail = |reason: String| ImageError::Busybox {
        path: busybox.to_path_buf(),
        reason,
    };
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(format!("exit status {}", out.status)));
    }
    let text = String::from_utf8(out.stdout).map_err(|_| fail("output is not UTF-8".into()))?;
    let list: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains("..") && !l.starts_with('/'))
        .map(|l| format!("/{l}"))
        .collect();
    if list.is_empty() {
        return Err(fail("it lists no applets".into()));
    }
    Ok(list)
}
