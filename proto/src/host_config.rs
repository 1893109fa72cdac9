//! `host.toml`, the configuration file of one `snowflockd`: its shape,
//! read by the daemon and written by `snowflock cluster up`.
//!
//! Only the file's shape lives here. What the settings mean, and which
//! combinations are valid, is the daemon's business
//! (`snowflockd::host::config::Config::apply_file`).

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default location of the host configuration file.
pub const HOST_CONFIG: &str = "/etc/snowflock/host.toml";

/// Another host of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: String,
    /// Its control channel address.
    pub addr: SocketAddr,
}

/// `host.toml` as written by sysadmins (and by `snowflock cluster up`).
/// Every setting is optional; `None` ones are left out when written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser::path")]
    pub socket: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser::path")]
    pub state_dir: Option<PathBuf>,
    /// Where memtap keeps the memory pages and disk blocks this host
    /// fetched from other hosts (default `<state_dir>/memcache`). Put it on
    /// a disk for clones of VMs with large disks.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser::path"
    )]
    pub memcache_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser::path")]
    pub qemu: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_vms: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_per_vm: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_server: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser::path")]
    pub key_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser::int")]
    pub fetch_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch_pages: Option<u32>,
    /// Seconds an unused ticket keeps its clones' capacity (default 600).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser::int")]
    pub ticket_ttl_s: Option<u64>,
    /// Multicast copies of served pages to every host of a generation, and
    /// join those groups (default true; false: unicast only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcast: Option<bool>,
    /// UDP port of the page datagrams (default 7404).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcast_port: Option<u16>,
    /// Highest rate of this host's page server's multicast, MiB/s
    /// (default 256).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser::int"
    )]
    pub mcast_rate_mib: Option<u64>,
    /// Most MiB the cache of one generation holds on this host (default:
    /// the generation's size).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser::int"
    )]
    pub memcache_limit_mib: Option<u64>,
    /// Tickets ask for background completion unless the guest says
    /// otherwise (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub independent: Option<bool>,
    /// Rate of background completion, MiB/s (default 64).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser::int"
    )]
    pub completion_rate_mib: Option<u64>,
    /// Keep the pages other hosts' clones faulted (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_siblings: Option<bool>,
    /// Where memtap writes each clone's page-fault trace (default: none).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser::path"
    )]
    pub fault_trace_dir: Option<PathBuf>,
    /// Who grants tickets: `[allocator]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocator: Option<AllocatorFile>,
    #[serde(default)]
    pub peers: Vec<Peer>,
}

/// `[allocator]`: who decides how many clones a ticket gets and on which
/// hosts. `kind = "static"` (the default) spreads clones over this host and
/// its peers by their free VM slots; `kind = "slurm"` asks the cluster's
/// Slurm for an allocation per ticket (docs/slurm.md). The other keys are
/// Slurm's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocatorFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Slurm partition (`salloc -p`; default: Slurm's default partition).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Slurm account charged (`salloc -A`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Slurm QOS (`salloc -q`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<String>,
    /// Slurm time limit of an allocation, in Slurm's format (`salloc -t`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_limit: Option<String>,
    /// Seconds a ticket request waits for Slurm to grant nodes (default 30).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser::int")]
    pub wait_s: Option<u64>,
    /// Clones per granted node (default: the free VM slots its daemon reports).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots_per_node: Option<u32>,
    /// `SLURM_CONF` for Slurm's commands (default: Slurm's own default).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser::path"
    )]
    pub slurm_conf: Option<PathBuf>,
    /// Slurm node name to snowflock host name, where they differ.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub nodes: std::collections::BTreeMap<String, String>,
}

/// Errors in the host configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read {path}")]
    Read {
        path: String,
        #[source]
        err: std::io::Error,
    },
    #[error("Malformed {path}")]
    Parse {
        path: String,
        #[source]
        err: toml::de::Error,
    },
    /// A setting (or combination) the daemon does not accept.
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
}

impl HostFile {
    /// Parses the text of a `host.toml`; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<HostFile, ConfigError> {
        toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.into(),
            err,
        })
    }

    /// Reads and parses a `host.toml`.
    pub fn load(path: &Path) -> Result<HostFile, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: p.clone(),
            err,
        })?;
        Self::parse(&text, &p)
    }

    /// The file as TOML text, which [`HostFile::parse`] reads back.
    ///
    /// TOML cannot hold everything a `HostFile` can: a path that is not
    /// UTF-8 is written with its bad bytes replaced by U+FFFD, and a u64
    /// setting (`fetch_timeout_ms`, the `*_mib` ones) above `i64::MAX` is
    /// written as `i64::MAX` (the daemon rejects both values anyway).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("every HostFile field has a TOML form")
    }
}

/// Serialisers that cannot fail on values TOML has no form for.
mod ser {
    use serde::Serializer;
    use std::path::PathBuf;

    // serde hands `serialize_with` a reference to the field's own type.
    pub fn path<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.serialize_str(&p.to_string_lossy()),
            None => s.serialize_none(),
        }
    }

    pub fn int<S: Serializer>(n: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match n {
            Some(n) => s.serialize_i64(i64::try_from(*n).unwrap_or(i64::MAX)),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> HostFile {
        HostFile {
            host: Some("h1".into()),
            socket: Some("/run/x/h1.sock".into()),
            state_dir: Some("/dev/shm/x/h1".into()),
            memcache_dir: Some("/var/cache/snowflock/memtap".into()),
            net_prefix: Some("sx".into()),
            qemu: Some("/usr/bin/qemu-system-x86_64".into()),
            max_vms: Some(8),
            quota_per_vm: Some(4),
            listen: Some("10.249.0.2:7170".parse().unwrap()),
            page_server: Some("10.249.0.2:7171".parse().unwrap()),
            key_file: Some("/run/x/key".into()),
            fetch_timeout_ms: Some(2000),
            prefetch_pages: Some(3),
            ticket_ttl_s: Some(60),
            mcast: Some(false),
            mcast_port: Some(7405),
            mcast_rate_mib: Some(100),
            memcache_limit_mib: Some(512),
            independent: Some(true),
            completion_rate_mib: Some(32),
            prefetch_siblings: Some(false),
            fault_trace_dir: Some("/var/tmp/traces".into()),
            allocator: Some(AllocatorFile {
                kind: Some("slurm".into()),
                partition: Some("snowflock".into()),
                account: Some("lab".into()),
                qos: Some("short".into()),
                time_limit: Some("1:00:00".into()),
                wait_s: Some(20),
                slots_per_node: Some(2),
                slurm_conf: Some("/etc/slurm/slurm.conf".into()),
                nodes: [("node7".to_string(), "h2".to_string())].into(),
            }),
            peers: vec![
                Peer {
                    name: "h0".into(),
                    addr: "10.249.0.1:7170".parse().unwrap(),
                },
                Peer {
                    name: "h2".into(),
                    addr: "10.249.0.3:7170".parse().unwrap(),
                },
            ],
        }
    }

    #[test]
    fn written_files_read_back() {
        let f = full();
        let text = f.to_toml();
        assert_eq!(HostFile::parse(&text, "t").unwrap(), f);
        assert_eq!(text.matches("[[peers]]").count(), 2);
        assert!(text.contains("listen = \"10.249.0.2:7170\""), "{text}");
        // Scalars come before the first table, or TOML would put them in it.
        assert!(text.find("prefetch_pages").unwrap() < text.find("[[peers]]").unwrap());
        assert!(text.find("fault_trace_dir").unwrap() < text.find("[allocator]").unwrap());
        assert!(text.contains("mcast = false"), "{text}");
        assert!(text.contains("mcast_port = 7405"), "{text}");
        assert!(text.contains("[allocator]"), "{text}");
        assert!(text.contains("node7 = \"h2\""), "{text}");
    }

    #[test]
    fn unset_settings_are_left_out() {
        let f = HostFile {
            host: Some("solo".into()),
            ..HostFile::default()
        };
        let text = f.to_toml();
        assert!(text.contains("host = \"solo\""), "{text}");
        for key in [
            "socket",
            "max_vms",
            "listen",
            "key_file",
            "fetch_timeout_ms",
            "mcast",
            "memcache_limit_mib",
            "independent",
            "completion_rate_mib",
            "prefetch_siblings",
            "fault_trace_dir",
        ] {
            assert!(!text.contains(key), "{key} in {text}");
        }
        assert_eq!(HostFile::parse(&text, "t").unwrap(), f);
        assert_eq!(HostFile::parse("", "t").unwrap(), HostFile::default());
    }

    #[test]
    fn strings_are_escaped() {
        let f = HostFile {
            host: Some("a\"b\\c\n".into()),
            key_file: Some("/k \"x\"".into()),
            ..HostFile::default()
        };
        assert_eq!(HostFile::parse(&f.to_toml(), "t").unwrap(), f);
    }

    #[test]
    fn out_of_range_values_still_write() {
        let f = HostFile {
            fetch_timeout_ms: Some(u64::MAX),
            mcast_rate_mib: Some(u64::MAX),
            memcache_limit_mib: Some(u64::MAX),
            completion_rate_mib: Some(u64::MAX),
            ..HostFile::default()
        };
        let back = HostFile::parse(&f.to_toml(), "t").unwrap();
        assert_eq!(back.fetch_timeout_ms, Some(i64::MAX as u64));
        assert_eq!(back.mcast_rate_mib, Some(i64::MAX as u64));
        assert_eq!(back.memcache_limit_mib, Some(i64::MAX as u64));
        assert_eq!(back.completion_rate_mib, Some(i64::MAX as u64));
    }

    #[test]
    fn parse_errors_name_the_file() {
        for text in [
            "host = 3",
            "hots = \"a\"",
            "listen = \"nonsense\"",
            "[[peers]]\nname = \"a\"",
            "mcast = \"on\"",
            "mcast_port = 70000",
            "mcast_rate_mib = -1",
        ] {
            let e = HostFile::parse(text, "/etc/x.toml").unwrap_err();
            let msg = crate::error::chain(&e);
            assert!(
                msg.starts_with("Malformed /etc/x.toml: "),
                "{text:?}: {msg}"
            );
        }
        let e = HostFile::load(Path::new("/nonexistent/host.toml")).unwrap_err();
        assert!(crate::error::chain(&e).starts_with("Cannot read /nonexistent/host.toml: "));
    }
}
