//! `snowflock cluster up`: checks, claims the name, builds the cluster
//! (key, `cluster.json`, network, `host.toml` files, daemons) and removes
//! what it built if any step fails. An existing healthy cluster is reused.

use super::host_config::{render_host_toml, Settings};
use super::layout::{name_flag, ClusterInfo, Layout, CONFIG_ROOT};
use super::{daemon, down, fabric, key, DEFAULT_HOSTS, MAX_HOSTS};
use anyhow::{bail, Context, Result};
use std::os::unix::fs::PermissionsExt;

/// Options of `cluster up`.
pub struct UpOpts {
    pub name: String,
    /// `None`: any size will do for an existing cluster; a new one gets [`DEFAULT_HOSTS`].
    pub hosts: Option<u32>,
    pub settings: Settings,
}

/// What `up` did.
pub struct Up {
    pub info: ClusterInfo,
    /// False when the cluster was already up.
    pub started: bool,
}

/// `snowflock cluster up`.
pub fn up(o: &UpOpts) -> Result<Up> {
    let l = Layout::new(&o.name)?;
    if let Some(n) = o.hosts {
        if !(1..=MAX_HOSTS).contains(&n) {
            bail!("--hosts must be 1 to {MAX_HOSTS}, got {n}");
        }
    }
    if o.settings.max_vms == 0 || o.settings.quota_per_vm == 0 {
        bail!("--max-vms and --quota-per-vm must be at least 1");
    }
    if !crate::sys::is_root() {
        bail!("`snowflock cluster up` must run as root (it creates network namespaces)");
    }
    let redo = format!(
        "run `snowflock cluster down{}` first, then `cluster up` again",
        name_flag(&l.name)
    );
    if !l.config_dir().exists() {
        let leftovers: Vec<String> = fabric::existing_netns(&l)
            .into_iter()
            .chain(
                l.state_root()
                    .exists()
                    .then(|| l.state_root().display().to_string()),
            )
            .collect();
        if !leftovers.is_empty() {
            bail!(
                "leftovers of a local cluster `{}` exist ({}): {redo}",
                l.name,
                leftovers.join(", ")
            );
        }
    }
    std::fs::create_dir_all(CONFIG_ROOT).with_context(|| format!("Cannot create {CONFIG_ROOT}"))?;
    // Creating the config directory claims the name: a second `up` finds it.
    match std::fs::create_dir(l.config_dir()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return existing(&l, o.hosts, o.settings.slurm.is_some(), &redo)
        }
        Err(e) => {
            return Err(e).with_context(|| format!("Cannot create {}", l.config_dir().display()))
        }
    }
    let n = o.hosts.unwrap_or(DEFAULT_HOSTS);
    let mut info = l.info(n);
    match build(&l, &mut info, &o.settings) {
        Ok(()) => Ok(Up {
            info,
            started: true,
        }),
        Err(e) => {
            eprintln!(
                "cluster `{}`: start failed; removing what was created",
                l.name
            );
            if let Err(e2) = down::teardown(&l, Some(info), false) {
                eprintln!("cluster `{}`: cleanup incomplete: {e2:#}", l.name);
            }
            Err(e)
        }
    }
}

/// `up` for a name whose config directory exists.
fn existing(l: &Layout, hosts: Option<u32>, slurm: bool, redo: &str) -> Result<Up> {
    let info = match super::layout::load(&l.name) {
        Ok(i) => i,
        Err(_) => bail!(
            "local cluster `{}` is half-built ({} has no cluster.json; another `cluster up` may be running): {redo}",
            l.name,
            l.config_dir().display()
        ),
    };
    let down: Vec<&str> = info
        .hosts
        .iter()
        .zip(daemon::probe_all(&info))
        .filter(|(_, s)| s.is_none())
        .map(|(h, _)| h.name.as_str())
        .collect();
    if !down.is_empty() || info.hosts.is_empty() {
        bail!(
            "local cluster `{}` exists but is broken (daemons not answering: {}): {redo}",
            l.name,
            down.join(", ")
        );
    }
    if slurm && info.slurm.is_none() {
        bail!(
            "local cluster `{}` is already up without Slurm: {redo} with --slurm",
            l.name
        );
    }
    if let Some(n) = hosts {
        if n as usize != info.hosts.len() {
            bail!(
                "local cluster `{}` is already up with {} hosts, not {n}: {redo}",
                l.name,
                info.hosts.len()
            );
        }
    }
    eprintln!(
        "local cluster `{}` is already up ({} hosts, all answering)",
        l.name,
        info.hosts.len()
    );
    Ok(Up {
        info,
        started: false,
    })
}

/// Creates namespaces, links, files and daemons; `info` gets the pids.
fn build(l: &Layout, info: &mut ClusterInfo, s: &Settings) -> Result<()> {
    let n = info.hosts.len() as u32;
    let dir = l.config_dir();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    key::write_key(&l.key_file())?;
    std::fs::create_dir_all(l.state_root())
        .with_context(|| format!("Cannot create {}", l.state_root().display()))?;
    info.save(&l.cluster_json())?;

    let fab = l.fabric_netns();
    fabric::create(&fab)?;
    for (i, h) in info.hosts.iter().enumerate() {
        let i = i as u32;
        fabric::connect_host(&fab, h)?;
        let hdir = h.config.parent().expect("host dir");
        std::fs::create_dir_all(hdir)
            .with_context(|| format!("Cannot create {}", hdir.display()))?;
        std::fs::create_dir_all(&h.state_dir)
            .with_context(|| format!("Cannot create {}", h.state_dir.display()))?;
        std::fs::write(&h.config, render_host_toml(l, i, n, s))
            .with_context(|| format!("Cannot write {}", h.config.display()))?;
    }
    if s.slurm.is_some() {
        eprintln!("cluster `{}`: starting Slurm (munged, MariaDB, slurmdbd, slurmctld on h0, slurmd on every host)", l.name);
        let t = std::time::Instant::now();
        let json = l.cluster_json();
        info.slurm = Some(super::layout::SlurmInfo {
            conf: super::slurm::conf_path(l),
            dir: l.config_dir().join("slurm"),
            procs: Vec::new(),
        });
        let mut record = |p: super::layout::SlurmProc| {
            if let Some(sl) = info.slurm.as_mut() {
                sl.procs.push(p);
            }
            info.save(&json)
        };
        super::slurm::start(l, n, &mut record)?;
        eprintln!(
            "cluster `{}`: Slurm up in {:.1} s (SLURM_CONF={})",
            l.name,
            t.elapsed().as_secs_f64(),
            super::slurm::conf_path(l).display()
        );
    }
    eprintln!(
        "cluster `{}`: fabric {fab} with {n} host namespace(s) ready; starting daemons",
        l.name
    );

    let mut children = Vec::new();
    for idx in 0..info.hosts.len() {
        let child = daemon::spawn(&info.hosts[idx])?;
        info.hosts[idx].pid = Some(child.id());
        children.push(child);
        info.save(&l.cluster_json())?;
    }
    daemon::wait_ready(info, &mut children)
}
