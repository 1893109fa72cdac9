//! A VM's serial console log on the host: bounded reads, and trimming a
//! log the guest keeps writing.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Console bytes kept per VM: the guest decides how much it prints, and
/// the log lives on a tmpfs.
pub const CONSOLE_KEEP: u64 = 1 << 20;

/// Once more than 4x [`CONSOLE_KEEP`] is allocated, punches out all but
/// the last [`CONSOLE_KEEP`] bytes. The file keeps its length (QEMU writes
/// at its own offset), so readers use [`read_tail`]. A missing file is not
/// an error.
pub fn trim(path: &Path) -> std::io::Result<()> {
    let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) else {
        return Ok(());
    };
    let m = f.metadata()?;
    if m.blocks() * 512 <= 4 * CONSOLE_KEEP {
        return Ok(());
    }
    let cut = m.len().saturating_sub(CONSOLE_KEEP) & !4095;
    super::sys::punch_hole(&f, cut)
}

/// At most the last `max` bytes of a file (the guest controls its console
/// log's size).
pub fn read_tail(path: &Path, max: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max {
        let _ = f.seek(SeekFrom::Start(len - max));
    }
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    // A trimmed log starts with a hole: skip its zeros.
    let start = buf.iter().position(|&b| b != 0).unwrap_or(buf.len());
    buf.drain(..start);
    buf
}

/// The last lines of a console log, indented for an error message.
pub fn tail_lines(path: &Path) -> String {
    let log = read_tail(path, 16 * 1024);
    let text = String::from_utf8_lossy(&log);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..]
        .iter()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn trimmed_log_keeps_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let mut f = std::fs::File::create(&p).unwrap();
        for i in 0..(5 * CONSOLE_KEEP / 64) {
            writeln!(f, "{i:063}").unwrap();
        }
        drop(f);
        trim(&p).unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        assert_eq!(len, 5 * CONSOLE_KEEP, "length kept");
        let tail = read_tail(&p, 2 * CONSOLE_KEEP);
        assert!(tail.len() as u64 <= CONSOLE_KEEP + 4096);
        assert!(tail[0] != 0, "the hole's zeros are skipped");
        assert!(tail_lines(&p).ends_with(&format!("{:063}", 5 * CONSOLE_KEEP / 64 - 1)));
        assert!(trim(&dir.path().join("missing")).is_ok());
    }
}
