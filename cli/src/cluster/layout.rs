//! Names and paths of a local cluster, and its `cluster.json`.
//!
//! Everything here follows from the cluster's name: the namespaces
//! (`NAME-fab`, `NAME-hI`), the host addresses on the fabric, the files under
//! `/run/snowflock/NAME/` and the state directories under
//! `/dev/shm/snowflock-NAME/`. `cluster.json` ([`ClusterInfo`]) records them
//! with the daemons' pids; `--host` and `cluster down` read it back.

use super::DEFAULT_NAME;
use crate::client::Client;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Where every local cluster keeps its configuration directory.
pub(super) const CONFIG_ROOT: &str = "/run/snowflock";

/// Cluster names: 1-8 of `[a-z0-9]`, so `NAME-h31` and the daemons' link
/// names stay within the kernel's 15 characters.
pub fn valid_name(name: &str) -> bool {
    (1..=8).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn check_name(name: &str) -> Result<()> {
    if !valid_name(name) {
        bail!("invalid cluster name {name:?}: use 1 to 8 characters of a-z and 0-9");
    }
    Ok(())
}

/// Names and paths of a cluster, derived from its name only.
#[derive(Debug, Clone)]
pub struct Layout {
    pub name: String,
}

impl Layout {
    pub fn new(name: &str) -> Result<Layout> {
        check_name(name)?;
        Ok(Layout { name: name.into() })
    }

    pub fn config_dir(&self) -> PathBuf {
        Path::new(CONFIG_ROOT).join(&self.name)
    }

    pub fn cluster_json(&self) -> PathBuf {
        self.config_dir().join("cluster.json")
    }

    pub fn key_file(&self) -> PathBuf {
        self.config_dir().join("key")
    }

    pub fn state_root(&self) -> PathBuf {
        PathBuf::from(format!("/dev/shm/snowflock-{}", self.name))
    }

    pub fn fabric_netns(&self) -> String {
        format!("{}-fab", self.name)
    }

    pub fn host_netns(&self, i: u32) -> String {
        format!("{}-h{i}", self.name)
    }

    /// Whether `ns` is one of this cluster's namespaces (`NAME-fab`, `NAME-h<digits>`).
    pub fn owns_netns(&self, ns: &str) -> bool {
        let Some(rest) = ns
            .strip_prefix(self.name.as_str())
            .and_then(|r| r.strip_prefix('-'))
        else {
            return false;
        };
        rest == "fab"
            || rest
                .strip_prefix('h')
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    }

    /// What `cluster.json` says about host `i`, before its daemon runs.
    pub fn host(&self, i: u32) -> HostInfo {
        let name = host_name(i);
        let dir = self.config_dir().join(&name);
        HostInfo {
            netns: self.host_netns(i),
            ip: host_ip(i).to_string(),
            socket: dir.join("snowflockd.sock"),
            config: dir.join("host.toml"),
            log: dir.join("snowflockd.log"),
            pid: None,
            state_dir: self.state_root().join(&name),
            name,
        }
    }

    pub fn info(&self, hosts: u32) -> ClusterInfo {
        ClusterInfo {
            name: self.name.clone(),
            fabric_netns: self.fabric_netns(),
            key_file: self.key_file(),
            hosts: (0..hosts).map(|i| self.host(i)).collect(),
            slurm: None,
        }
    }
}

pub fn host_name(i: u32) -> String {
    format!("h{i}")
}

/// Host `i`'s address on the fabric.
pub fn host_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 249, 0, (i + 1) as u8)
}

/// `cluster.json`: what `cluster down` and `--host` need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub name: String,
    pub fabric_netns: String,
    pub key_file: PathBuf,
    pub hosts: Vec<HostInfo>,
    /// The cluster's own Slurm (`cluster up --slurm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm: Option<SlurmInfo>,
}

/// The local cluster's Slurm, in `cluster.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlurmInfo {
    /// `SLURM_CONF` for Slurm's own tools.
    pub conf: PathBuf,
    pub dir: PathBuf,
    /// Started processes, in start order.
    pub procs: Vec<SlurmProc>,
}

/// One Slurm daemon of the local cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlurmProc {
    pub what: String,
    pub pid: u32,
}

/// One host of `cluster.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// The daemon's pid (recorded when started; `down` signals only these).
    pub pid: Option<u32>,
    pub state_dir: PathBuf,
}

impl ClusterInfo {
    pub fn host(&self, name: &str) -> Result<&HostInfo> {
        match self.hosts.iter().find(|h| h.name == name) {
            Some(h) => Ok(h),
            None => {
                let names: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).collect();
                bail!(
                    "no host `{name}` in local cluster `{}` (its hosts: {})",
                    self.name,
                    names.join(", ")
                )
            }
        }
    }

    /// Writes `cluster.json` atomically (a temporary file renamed into place).
    pub(super) fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("Cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("Cannot write {}", path.display()))?;
        Ok(())
    }
}

/// Reads `/run/snowflock/NAME/cluster.json`.
pub fn load(name: &str) -> Result<ClusterInfo> {
    let l = Layout::new(name)?;
    let path = l.cluster_json();
    match std::fs::read(&path) {
        Ok(b) => {
            serde_json::from_slice(&b).with_context(|| format!("Malformed {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "no local cluster `{name}`: run `snowflock cluster up{}`",
                name_flag(name)
            )
        }
        Err(e) => Err(e).with_context(|| format!("Cannot read {}", path.display())),
    }
}

/// ` --name NAME` for messages suggesting a command, empty for the default name.
pub(super) fn name_flag(name: &str) -> String {
    if name == DEFAULT_NAME {
        String::new()
    } else {
        format!(" --name {name}")
    }
}

/// A client for host `host` of the local cluster `cluster`.
pub fn host_client(cluster: &str, host: &str) -> Result<Client> {
    let info = load(cluster)?;
    let h = info.host(host)?;
    Ok(client_for(&info, h))
}

fn client_for(info: &ClusterInfo, h: &HostInfo) -> Client {
    Client::with_hint(
        &h.socket,
        format!(
            "host {} of local cluster `{}` is down (see `snowflock cluster status{}`)",
            h.name,
            info.name,
            name_flag(&info.name)
        ),
    )
}

/// Host `h0` of the local cluster `cluster`, if that cluster exists.
pub fn first_host_client(cluster: &str) -> Option<(Client, String)> {
    let info = load(cluster).ok()?;
    let h = info.hosts.first()?;
    Some((client_for(&info, h), h.name.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::MAX_HOSTS;

    #[test]
    fn names() {
        for ok in ["sfc", "a", "12345678", "t0012x", "sfdemo"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "123456789", "Sfc", "s-c", "s_c", "s c", "é", "../x"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(Layout::new("a/b").is_err());
        // The longest names fit the kernel's 15-character interface names.
        let l = Layout::new("abcdefgh").unwrap();
        assert!(l.host_netns(MAX_HOSTS - 1).len() <= 15);
        assert!(l.fabric_netns().len() <= 15);
    }

    #[test]
    fn netns_ownership() {
        let l = Layout::new("sfc").unwrap();
        for yes in ["sfc-h0", "sfc-h12", "sfc-fab"] {
            assert!(l.owns_netns(yes), "{yes}");
        }
        for no in [
            "sfc-h", "sfc-hx", "sfc-h1a", "sfcx-h0", "sf-h0", "sfc-fabx", "sfc", "other-h0",
            "sfc-h0-x",
        ] {
            assert!(!l.owns_netns(no), "{no}");
        }
    }

    #[test]
    fn layout_paths_and_addresses() {
        let l = Layout::new("sfc").unwrap();
        let h = l.host(2);
        assert_eq!(h.name, "h2");
        assert_eq!(h.netns, "sfc-h2");
        assert_eq!(h.ip, "10.249.0.3");
        assert_eq!(h.socket, Path::new("/run/snowflock/sfc/h2/snowflockd.sock"));
        assert_eq!(h.config, Path::new("/run/snowflock/sfc/h2/host.toml"));
        assert_eq!(h.log, Path::new("/run/snowflock/sfc/h2/snowflockd.log"));
        assert_eq!(h.state_dir, Path::new("/dev/shm/snowflock-sfc/h2"));
        assert_eq!(l.key_file(), Path::new("/run/snowflock/sfc/key"));
        assert_eq!(l.fabric_netns(), "sfc-fab");
        assert_eq!(host_ip(MAX_HOSTS - 1), Ipv4Addr::new(10, 249, 0, 32));
    }

    #[test]
    fn cluster_json_round_trip() {
        let l = Layout::new("rt").unwrap();
        let mut info = l.info(3);
        info.hosts[1].pid = Some(4242);
        let text = serde_json::to_string_pretty(&info).unwrap();
        let back: ClusterInfo = serde_json::from_str(&text).unwrap();
        assert_eq!(back, info);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["name"], "rt");
        assert_eq!(v["hosts"][1]["pid"], 4242);
        assert_eq!(v["hosts"][0]["pid"], serde_json::Value::Null);
        for k in [
            "name",
            "netns",
            "ip",
            "socket",
            "config",
            "log",
            "pid",
            "state_dir",
        ] {
            assert!(v["hosts"][2].get(k).is_some(), "hosts[].{k} missing");
        }
        assert_eq!(
            v["hosts"][2]["socket"],
            "/run/snowflock/rt/h2/snowflockd.sock"
        );
        assert!(back.host("h2").is_ok());
        let e = back.host("h7").unwrap_err().to_string();
        assert!(e.contains("h0, h1, h2"), "{e}");
    }
}
