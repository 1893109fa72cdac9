//! Who this VM is, and becoming a clone.
//!
//! A fresh clone is a byte-for-byte copy of its parent. On
//! `BecomeClone{request_id, identity}` the agent makes it distinct, in this
//! order: reseed (and credit) the kernel RNG, set the clock, set the
//! hostname and `/etc/hostname`, write `/etc/machine-id`, move the VM's
//! interface (`[network] interface` in `agent.toml`, `eth0` by default) to
//! the clone's MAC and IP and flush stale neighbours. Then it records the
//! identity (memory and `identity.json`), sends `Ready` and answers the
//! pending `sf_clone` with the clone ID; a gratuitous ARP follows, best
//! effort. `Ready` goes out before the app's answer so that the host sees it
//! before any API call the clone makes next.
//!
//! Every field is validated before anything is changed, so a bad identity
//! leaves the VM untouched and is reported with `CloneFailed`.
//!
//! The checks and setters here also serve the VM's first identity at boot
//! ([`super::boot`]).

use super::{lock, sys, Agent, AgentConfig};
use serde::{Deserialize, Serialize};
use snowflock_proto::api::{valid_ticket_syntax, ApiErrorCode, ApiResponse};
use snowflock_proto::channel::{CloneIdentity, GuestMsg};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Name of the identity record in the state directory.
pub const IDENTITY_FILE: &str = "identity.json";
/// Largest accepted RNG seed.
pub const MAX_SEED: usize = 4096;

/// Why an identity is rejected or cannot be applied. The text goes to the
/// host in `CloneFailed` and to the app, so it says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("Clone ID 0 is the parent's")]
    ParentCloneId,
    #[error("Malformed ticket {0:?}")]
    Ticket(String),
    #[error("Malformed VM name {0:?}")]
    VmName(String),
    #[error("Malformed hostname {0:?}")]
    Hostname(String),
    #[error("Malformed machine id {0:?}")]
    MachineId(String),
    #[error("Malformed or multicast MAC {0:?}")]
    UnicastMac(String),
    #[error("Malformed MAC {0:?}")]
    Mac(String),
    #[error("Malformed IP {0:?}")]
    Ip(String),
    #[error("Malformed address {0:?}")]
    Cidr(String),
    #[error("Malformed IPv4 address {0:?}")]
    Ipv4(String),
    #[error("Malformed prefix in {0:?}")]
    Prefix(String),
    #[error("RNG seed must be 1 to {MAX_SEED} bytes, got {0}")]
    SeedSize(usize),
    #[error("Clock value is 0")]
    ZeroClock,
    #[error("Cannot open /dev/urandom: {0}")]
    OpenUrandom(#[source] std::io::Error),
    #[error("Cannot reseed the kernel CRNG: {0}")]
    ReseedCrng(#[source] std::io::Error),
    #[error("Cannot write the seed to /dev/urandom: {0}")]
    WriteSeed(#[source] std::io::Error),
    #[error("Cannot set the clock: {}", .0.desc())]
    SetClock(#[source] nix::Error),
    #[error("Cannot set the hostname: {}", .0.desc())]
    SetHostname(#[source] nix::Error),
    #[error("Cannot reconfigure {dev}: {source}")]
    Interface { dev: String, source: std::io::Error },
    #[error("Cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Serialize(#[from] serde_json::Error),
}

/// What `Id` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub vm: String,
    pub clone_id: u32,
    pub ticket: Option<String>,
    pub ip: Option<String>,
    /// Prefix length of the flock network `ip` is in.
    #[serde(default = "flock_prefix")]
    pub prefix: u8,
}

fn flock_prefix() -> u8 {
    24
}

impl State {
    /// `IP/PREFIX` on the flock network, if the VM has an address.
    pub fn ip_cidr(&self) -> Option<String> {
        self.ip.as_ref().map(|ip| format!("{ip}/{}", self.prefix))
    }
}

/// Contents of `identity.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct IdentityFile {
    #[serde(flatten)]
    state: State,
    hostname: String,
    mac: String,
    ip_cidr: String,
    machine_id: String,
}

impl State {
    /// The identity at start: `identity.json` if a previous agent run in
    /// this clone wrote one, else the kernel command line.
    pub fn initial(cfg: &AgentConfig) -> State {
        let path = cfg.state_dir().join(IDENTITY_FILE);
        if let Ok(text) = std::fs::read_to_string(&path) {
            match serde_json::from_str::<IdentityFile>(&text) {
                Ok(f) => return f.state,
                Err(e) => tracing::warn!("Ignoring malformed {}: {e}", path.display()),
            }
        }
        State::from_cmdline(&cfg.cmdline)
    }

    /// Reads `sf.vm=NAME` and `sf.ip=IP[/PREFIX]` from a kernel command line.
    pub fn from_cmdline(cmdline: &str) -> State {
        let mut s = State {
            vm: String::new(),
            clone_id: 0,
            ticket: None,
            ip: None,
            prefix: flock_prefix(),
        };
        for word in cmdline.split_whitespace() {
            if let Some(v) = word.strip_prefix("sf.vm=") {
                s.vm = v.to_string();
            } else if let Some(v) = word.strip_prefix("sf.ip=") {
                s.ip = Some(ip_of(v).to_string()).filter(|v| !v.is_empty());
                if let Ok((_, p)) = parse_cidr(v) {
                    s.prefix = p;
                }
            }
        }
        s
    }
}

pub(crate) fn parse_cidr(cidr: &str) -> Result<(std::net::Ipv4Addr, u8), IdentityError> {
    let (ip, prefix) = cidr
        .split_once('/')
        .ok_or_else(|| IdentityError::Cidr(cidr.to_string()))?;
    let ip = ip
        .parse()
        .map_err(|_| IdentityError::Ipv4(ip.to_string()))?;
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| IdentityError::Prefix(cidr.to_string()))?;
    Ok((ip, prefix))
}

pub(crate) fn parse_mac(mac: &str) -> Result<[u8; 6], IdentityError> {
    let bad = || IdentityError::Mac(mac.to_string());
    let parts = mac
        .split(':')
        .map(|h| {
            if h.len() == 2 {
                u8::from_str_radix(h, 16).ok()
            } else {
                None
            }
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    parts.try_into().map_err(|_| bad())
}

fn ip_of(cidr: &str) -> &str {
    cidr.split('/').next().unwrap_or(cidr)
}

/// A host name of letters, digits, `-` and `.`, 1 to 64 bytes, not
/// starting with `-` or `.`.
pub(crate) fn check_hostname(h: &str) -> Result<(), IdentityError> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && !h.starts_with(['-', '.'])
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Hostname(h.to_string()))
    }
}

/// 32 lowercase hex digits, as `/etc/machine-id` holds.
pub(crate) fn check_machine_id(m: &str) -> Result<(), IdentityError> {
    if m.len() == 32 && m.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(IdentityError::MachineId(m.to_string()))
    }
}

/// `xx:xx:xx:xx:xx:xx` with the multicast bit clear.
pub(crate) fn check_unicast_mac(mac: &str) -> Result<(), IdentityError> {
    let octets: Vec<&str> = mac.split(':').collect();
    let ok = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
        && u8::from_str_radix(octets[0], 16).is_ok_and(|b| b & 1 == 0);
    if ok {
        Ok(())
    } else {
        Err(IdentityError::UnicastMac(mac.to_string()))
    }
}

/// Sets the hostname and writes `/etc/hostname`.
pub(crate) fn set_hostname(h: &str) -> Result<(), IdentityError> {
    nix::unistd::sethostname(h).map_err(IdentityError::SetHostname)?;
    write_file("/etc/hostname", &format!("{h}\n"))
}

/// Writes `/etc/machine-id`.
pub(crate) fn set_machine_id(m: &str) -> Result<(), IdentityError> {
    write_file("/etc/machine-id", &format!("{m}\n"))
}

/// Checks every field before anything is applied.
pub fn validate(id: &CloneIdentity) -> Result<(), IdentityError> {
    if id.clone_id == 0 {
        return Err(IdentityError::ParentCloneId);
    }
    if !valid_ticket_syntax(&id.ticket) {
        return Err(IdentityError::Ticket(id.ticket.clone()));
    }
    if id.vm.is_empty()
        || id.vm.len() > 255
        || id.vm.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(IdentityError::VmName(id.vm.clone()));
    }
    check_hostname(&id.hostname)?;
    check_machine_id(&id.machine_id)?;
    check_unicast_mac(&id.mac)?;
    let (addr, prefix) = id
        .ip_cidr
        .split_once('/')
        .ok_or_else(|| IdentityError::Ip(id.ip_cidr.clone()))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| IdentityError::Ip(id.ip_cidr.clone()))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if !prefix.parse::<u8>().is_ok_and(|p| p <= max) {
        return Err(IdentityError::Ip(id.ip_cidr.clone()));
    }
    if id.seed.is_empty() || id.seed.len() > MAX_SEED {
        return Err(IdentityError::SeedSize(id.seed.len()));
    }
    if id.unix_time_ns == 0 {
        return Err(IdentityError::ZeroClock);
    }
    Ok(())
}

/// Applies a validated identity to the system, network interface `dev`,
/// or only logs the steps when `dry` (tests).
pub fn apply(id: &CloneIdentity, dev: &str, dry: bool) -> Result<(), IdentityError> {
    if dry {
        tracing::info!(
            "Dry identity: would reseed the RNG with {} bytes, set the clock to {} ns, hostname {}, machine-id {}, {dev} {} {}",
            id.seed.len(),
            id.unix_time_ns,
            id.hostname,
            id.machine_id,
            id.mac,
            id.ip_cidr
        );
        return Ok(());
    }
    reseed(&id.seed)?;
    set_clock(id.unix_time_ns)?;
    set_hostname(&id.hostname)?;
    set_machine_id(&id.machine_id)?;
    let (addr, prefix) = parse_cidr(&id.ip_cidr)?;
    let mac = parse_mac(&id.mac)?;
    sys::configure_interface(dev, mac, addr, prefix).map_err(|source| IdentityError::Interface {
        dev: dev.to_string(),
        source,
    })
}

fn reseed(seed: &[u8]) -> Result<(), IdentityError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(IdentityError::OpenUrandom)?;
    match sys::add_entropy(&f, seed) {
        Ok(()) => sys::reseed_crng(&f).map_err(IdentityError::ReseedCrng),
        Err(e) => {
            tracing::warn!("RNDADDENTROPY failed ({e}); mixing the seed in without credit");
            use std::io::Write;
            (&f).write_all(seed).map_err(IdentityError::WriteSeed)
        }
    }
}

fn set_clock(ns: u64) -> Result<(), IdentityError> {
    use nix::sys::time::TimeSpec;
    use nix::time::{clock_settime, ClockId};
    let ts = TimeSpec::new(
        (ns / 1_000_000_000) as libc::time_t,
        (ns % 1_000_000_000) as libc::c_long,
    );
    clock_settime(ClockId::CLOCK_REALTIME, ts).map_err(IdentityError::SetClock)
}

fn write_file(path: &str, text: &str) -> Result<(), IdentityError> {
    std::fs::write(path, text).map_err(|source| IdentityError::Write {
        path: path.into(),
        source,
    })
}

/// Full path of a busybox/iproute tool, or the bare name for `PATH` lookup.
fn tool(name: &str) -> PathBuf {
    ["/sbin", "/bin", "/usr/sbin", "/usr/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Announces the new MAC/IP pair, best effort, without delaying anything.
fn gratuitous_arp(ip: String, dev: &str) {
    let spawned = Command::new(tool("arping"))
        .args(["-U", "-c", "1", "-I", dev, &ip])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("arping not run: {e}");
            return;
        }
    };
    let _ = std::thread::Builder::new()
        .name("arping".into())
        .spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        });
}

fn write_identity_file(dir: &Path, id: &CloneIdentity, state: &State) -> Result<(), IdentityError> {
    let rec = IdentityFile {
        state: state.clone(),
        hostname: id.hostname.clone(),
        mac: id.mac.clone(),
        ip_cidr: id.ip_cidr.clone(),
        machine_id: id.machine_id.clone(),
    };
    let text = serde_json::to_string_pretty(&rec)? + "\n";
    let path = dir.join(IDENTITY_FILE);
    let tmp = dir.join(format!(".{IDENTITY_FILE}.tmp"));
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, text))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| IdentityError::Write { path, source })
}

/// Handles `BecomeClone`. `orphans` are the requests that were pending when
/// it arrived: the parent's host owned them, so they are failed here.
pub fn become_clone(agent: &Agent, request_id: u64, id: CloneIdentity, orphans: Vec<u64>) {
    let _serial = lock(&agent.clone_lock);
    let clone_id = id.clone_id;
    tracing::info!(
        "Becoming clone {clone_id} of ticket {} as {}",
        id.ticket,
        id.vm
    );
    let dev = agent.settings().network.interface;
    match validate(&id).and_then(|()| apply(&id, &dev, agent.cfg.dry_identity)) {
        Ok(()) => {
            let ip = ip_of(&id.ip_cidr).to_string();
            let state = State {
                vm: id.vm.clone(),
                clone_id,
                ticket: Some(id.ticket.clone()),
                ip: Some(ip.clone()),
                prefix: parse_cidr(&id.ip_cidr).map_or(flock_prefix(), |(_, p)| p),
            };
            *lock(&agent.identity) = state.clone();
            if let Err(e) = write_identity_file(&agent.cfg.state_dir(), &id, &state) {
                tracing::warn!("{e}");
            }
            for o in orphans {
                agent.answer(
                    o,
                    ApiResponse::Error {
                        code: ApiErrorCode::Failed,
                        message: format!("This VM became clone {clone_id} while the call was pending; it has no answer"),
                    },
                );
            }
            agent.chan.send_or_log(&GuestMsg::Ready { clone_id });
            if !agent.answer(
                request_id,
                ApiResponse::Cloned {
                    clone_id,
                    ticket: id.ticket.clone(),
                },
            ) {
                tracing::info!("No application waits for clone request {request_id}");
            }
            tracing::info!("Now clone {clone_id} ({}, {})", id.hostname, id.ip_cidr);
            if !agent.cfg.dry_identity {
                gratuitous_arp(ip, &dev);
            }
        }
        Err(message) => {
            tracing::error!("Cannot become clone {clone_id}: {message}");
            agent.chan.send_or_log(&GuestMsg::CloneFailed {
                clone_id,
                message: message.to_string(),
            });
            agent.answer(
                request_id,
                ApiResponse::Error {
                    code: ApiErrorCode::Failed,
                    message: format!("Cannot become clone {clone_id}: {message}"),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn good() -> CloneIdentity {
        CloneIdentity {
            clone_id: 2,
            ticket: "t-1f".into(),
            vm: "vm1-t1f-c2".into(),
            hostname: "vm1-c2".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            mac: "52:54:00:12:34:56".into(),
            ip_cidr: "10.250.3.12/24".into(),
            seed: vec![7; 32],
            unix_time_ns: 1_700_000_000_000_000_000,
        }
    }

    #[test]
    fn validation_accepts_good_and_rejects_each_bad_field() {
        validate(&good()).unwrap();
        let bad: Vec<fn(&mut CloneIdentity)> = vec![
            |i| i.clone_id = 0,
            |i| i.ticket = "x".into(),
            |i| i.vm = "a b".into(),
            |i| i.hostname = "-x".into(),
            |i| i.hostname = "a;rm".into(),
            |i| i.machine_id = "0123".into(),
            |i| i.machine_id = "0123456789ABCDEF0123456789abcdef".into(),
            |i| i.mac = "52:54:00:12:34".into(),
            |i| i.mac = "53:54:00:12:34:56".into(),
            |i| i.mac = "zz:54:00:12:34:56".into(),
            |i| i.ip_cidr = "10.0.0.1".into(),
            |i| i.ip_cidr = "10.0.0.1/33".into(),
            |i| i.ip_cidr = "-x/24".into(),
            |i| i.seed = vec![],
            |i| i.seed = vec![0; MAX_SEED + 1],
            |i| i.unix_time_ns = 0,
        ];
        for (n, f) in bad.iter().enumerate() {
            let mut i = good();
            f(&mut i);
            assert!(validate(&i).is_err(), "case {n} accepted");
        }
        let mut i = good();
        i.ip_cidr = "fd00::5/64".into();
        validate(&i).unwrap();
    }

    #[test]
    fn address_parsing() {
        assert_eq!(
            parse_cidr("10.250.3.4/24").unwrap(),
            ("10.250.3.4".parse().unwrap(), 24)
        );
        assert!(parse_cidr("10.250.3.4").is_err());
        assert!(parse_cidr("10.250.3.4/33").is_err());
        assert!(parse_cidr("x/24").is_err());
        assert_eq!(
            parse_mac("52:54:00:0a:00:ff").unwrap(),
            [0x52, 0x54, 0, 10, 0, 255]
        );
        assert!(parse_mac("52:54:00:0a:00").is_err());
        assert!(parse_mac("52:54:00:0a:00:ff:zz").is_err());
        assert!(parse_mac("52:54:00:0a:00:fff").is_err());
    }

    #[test]
    fn cmdline() {
        let s = State::from_cmdline("console=ttyS0 sf.vm=vm1 quiet sf.ip=10.250.3.1/24\n");
        assert_eq!(
            s,
            State {
                vm: "vm1".into(),
                clone_id: 0,
                ticket: None,
                ip: Some("10.250.3.1".into()),
                prefix: 24,
            }
        );
        let s = State::from_cmdline("console=ttyS0");
        assert_eq!(
            s,
            State {
                vm: String::new(),
                clone_id: 0,
                ticket: None,
                ip: None,
                prefix: 24,
            }
        );
    }

    #[test]
    fn identity_file_roundtrip_is_loaded_at_start() {
        let dir = std::env::temp_dir().join(format!("sf-ident-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let id = good();
        let st = State {
            vm: id.vm.clone(),
            clone_id: 2,
            ticket: Some(id.ticket.clone()),
            ip: Some("10.250.3.12".into()),
            prefix: 24,
        };
        write_identity_file(&dir, &id, &st).unwrap();
        let cfg = AgentConfig {
            port: super::super::port::PortSpec::Virtio,
            socket: dir.join("agent.sock"),
            config_file: dir.join("agent.toml"),
            dry_identity: true,
            cmdline: "sf.vm=other".into(),
            sysfs: None,
            sibling_port: 0,
            sibling_listen: std::net::Ipv4Addr::LOCALHOST.into(),
        };
        assert_eq!(State::initial(&cfg), st);
        std::fs::write(dir.join(IDENTITY_FILE), "{").unwrap();
        assert_eq!(State::initial(&cfg).vm, "other");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
