//! The `host.toml` of each host: the daemon's own configuration format
//! (see docs/deploy.md), written as text by [`render_host_toml`].
//!
//! This is the only place the CLI writes `host.toml`; it is meant to be
//! replaced by serialising the daemon's configuration type, so keep the
//! produced text exactly as it is (the tests pin it).

use super::layout::{host_ip, host_name, Layout};
use super::{CONTROL_PORT, PAGE_PORT};
use std::fmt::Write as _;
use std::path::Path;

/// Settings written into every host's `host.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub max_vms: u32,
    pub quota_per_vm: u32,
    pub fetch_timeout_ms: u64,
    pub prefetch_pages: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_vms: 16,
            quota_per_vm: 32,
            fetch_timeout_ms: 10_000,
            prefetch_pages: 0,
        }
    }
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.display().to_string())
}

/// The `host.toml` of host `i` of an `n`-host cluster.
pub fn render_host_toml(l: &Layout, i: u32, n: u32, s: &Settings) -> String {
    let h = l.host(i);
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# snowflockd configuration of host {} of the local cluster `{}`",
        h.name, l.name
    );
    let _ = writeln!(
        t,
        "# (written by `snowflock cluster up`; see docs/deploy.md)."
    );
    let _ = writeln!(t, "host = {}", toml_str(&h.name));
    let _ = writeln!(t, "socket = {}", toml_path(&h.socket));
    let _ = writeln!(t, "state_dir = {}", toml_path(&h.state_dir));
    let _ = writeln!(
        t,
        "listen = \"{}:{CONTROL_PORT}\"        # daemon-to-daemon control channel",
        h.ip
    );
    let _ = writeln!(
        t,
        "page_server = \"{}:{PAGE_PORT}\"   # memory page server",
        h.ip
    );
    let _ = writeln!(t, "key_file = {}", toml_path(&l.key_file()));
    let _ = writeln!(t, "max_vms = {}", s.max_vms);
    let _ = writeln!(t, "quota_per_vm = {}", s.quota_per_vm);
    let _ = writeln!(t, "fetch_timeout_ms = {}", s.fetch_timeout_ms);
    let _ = writeln!(t, "prefetch_pages = {}", s.prefetch_pages);
    if n <= 1 {
        let _ = writeln!(t, "peers = []");
    }
    for j in (0..n).filter(|j| *j != i) {
        let _ = writeln!(
            t,
            "\n[[peers]]\nname = {}\naddr = \"{}:{CONTROL_PORT}\"",
            toml_str(&host_name(j)),
            host_ip(j)
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_toml_of_a_two_host_cluster() {
        let l = Layout::new("ctest").unwrap();
        let s = Settings {
            max_vms: 16,
            quota_per_vm: 32,
            fetch_timeout_ms: 10000,
            prefetch_pages: 0,
        };
        let t = render_host_toml(&l, 0, 2, &s);
        let body: Vec<&str> = t.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "host = \"h0\"",
                "socket = \"/run/snowflock/ctest/h0/snowflockd.sock\"",
                "state_dir = \"/dev/shm/snowflock-ctest/h0\"",
                "listen = \"10.249.0.1:7170\"        # daemon-to-daemon control channel",
                "page_server = \"10.249.0.1:7171\"   # memory page server",
                "key_file = \"/run/snowflock/ctest/key\"",
                "max_vms = 16",
                "quota_per_vm = 32",
                "fetch_timeout_ms = 10000",
                "prefetch_pages = 0",
                "",
                "[[peers]]",
                "name = \"h1\"",
                "addr = \"10.249.0.2:7170\"",
            ]
        );
    }

    #[test]
    fn host_toml_peers_are_the_other_hosts() {
        let l = Layout::new("sfc").unwrap();
        let s = Settings {
            max_vms: 3,
            quota_per_vm: 4,
            fetch_timeout_ms: 500,
            prefetch_pages: 7,
        };
        let t = render_host_toml(&l, 2, 4, &s);
        let peers: Vec<&str> = t.lines().filter(|x| x.starts_with("name = ")).collect();
        assert_eq!(peers, ["name = \"h0\"", "name = \"h1\"", "name = \"h3\""]);
        let addrs: Vec<&str> = t.lines().filter(|x| x.starts_with("addr = ")).collect();
        assert_eq!(
            addrs,
            [
                "addr = \"10.249.0.1:7170\"",
                "addr = \"10.249.0.2:7170\"",
                "addr = \"10.249.0.4:7170\""
            ]
        );
        assert_eq!(t.matches("[[peers]]").count(), 3);
        for line in [
            "host = \"h2\"",
            "max_vms = 3",
            "quota_per_vm = 4",
            "fetch_timeout_ms = 500",
            "prefetch_pages = 7",
        ] {
            assert!(t.lines().any(|x| x == line), "{line} missing in\n{t}");
        }
        // Scalars come before the first table, or TOML would put them in it.
        assert!(t.find("prefetch_pages").unwrap() < t.find("[[peers]]").unwrap());
        // A one-host cluster says so explicitly.
        let one = render_host_toml(&l, 0, 1, &s);
        assert!(one.lines().any(|x| x == "peers = []"));
        assert!(!one.contains("[[peers]]"));
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000A\"");
    }
}
