//! `/etc/snowflock/agent.toml`: the sysadmin's choices for the agent.
//!
//! ```toml
//! [hooks]                     # pre-clone hooks, run by the agent
//! drop_caches = false         # default
//! compact = false             # default
//! malloc_trim = true          # default
//!
//! [balloon]                   # virtio-balloon free page reporting
//! free_page_reporting = true  # default; false unbinds the virtio_balloon driver
//! reporting_order = 0         # optional, 0..=10; unset leaves the kernel's value
//!
//! [network]                   # the VM's network interface
//! interface = "eth0"          # default; gets the VM's MAC and IP at boot and at clone
//! ```
//!
//! Every key is optional. Unknown tables and keys are ignored, so a newer
//! file still works with an older agent. Each table is parsed on its own
//! ([`Config::load_tables`]): a mistake in `[balloon]` does not disable the
//! hooks, and the other way round.

use serde::Deserialize;
use std::path::Path;

/// Default location of the agent configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/snowflock/agent.toml";

/// Default `[network] interface`: the kernel's name for the first NIC.
pub const DEFAULT_INTERFACE: &str = "eth0";

/// Longest interface name Linux accepts (`IFNAMSIZ` - 1).
pub const MAX_INTERFACE_LEN: usize = 15;

/// Largest accepted `[balloon] reporting_order`: the kernel accepts
/// `0..=MAX_PAGE_ORDER`, which is 10 on x86-64 and arm64 with 4 KiB pages.
pub const MAX_REPORTING_ORDER: u32 = 10;

/// Which pre-clone hooks the agent runs: the `[hooks]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct HookConfig {
    /// `sync` and drop the page cache, dentries and inodes.
    pub drop_caches: bool,
    /// Compact free memory.
    pub compact: bool,
    /// `malloc_trim(0)` in the agent itself.
    pub malloc_trim: bool,
}

impl Default for HookConfig {
    fn default() -> Self {
        Self {
            drop_caches: false,
            compact: false,
            malloc_trim: true,
        }
    }
}

/// Free page reporting: the `[balloon]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct BalloonConfig {
    /// True (default): the `virtio_balloon` driver is bound to the balloon
    /// device, so the guest reports free pages and the host punches holes
    /// for them. False: the agent unbinds the driver; nothing is reported.
    pub free_page_reporting: bool,
    /// Written to `page_reporting_order`: free blocks of `2^order` pages
    /// and larger are reported. `None` leaves the kernel's value (by
    /// default the pageblock order, 9: only 2 MiB blocks).
    pub reporting_order: Option<u32>,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        Self {
            free_page_reporting: true,
            reporting_order: None,
        }
    }
}

/// The VM's network interface: the `[network]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct NetworkConfig {
    /// The interface the host's NIC appears as. The agent gives it the
    /// VM's MAC and address at boot (`snowflock-agent --boot-identity`)
    /// and the clone's at `sf_clone`. Default [`DEFAULT_INTERFACE`]: with
    /// systemd's predictable names, boot with `net.ifnames=0` or name the
    /// interface here (`enp0s2`, ...).
    pub interface: String,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            interface: DEFAULT_INTERFACE.to_string(),
        }
    }
}

/// The whole of `agent.toml` as far as this crate knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub hooks: HookConfig,
    pub balloon: BalloonConfig,
    pub network: NetworkConfig,
}

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("Cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key has the wrong type.
    #[error("Malformed configuration {path}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    /// A key has a value out of its range.
    #[error("Invalid configuration {path}: {message}")]
    Invalid { path: String, message: String },
}

/// `agent.toml` parsed table by table: see [`Config::load_tables`].
#[derive(Debug)]
pub struct Tables {
    /// False when the file does not exist (both tables are then defaults).
    pub found: bool,
    pub hooks: Result<HookConfig, ConfigError>,
    pub balloon: Result<BalloonConfig, ConfigError>,
    pub network: Result<NetworkConfig, ConfigError>,
}

impl Tables {
    /// Every table, or the first error.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        Ok(Config {
            hooks: self.hooks?,
            balloon: self.balloon?,
            network: self.network?,
        })
    }
}

#[derive(Deserialize)]
struct HooksFile {
    #[serde(default)]
    hooks: HookConfig,
}

#[derive(Deserialize)]
struct BalloonFile {
    #[serde(default)]
    balloon: BalloonConfig,
}

#[derive(Deserialize)]
struct NetworkFile {
    #[serde(default)]
    network: NetworkConfig,
}

fn parse_error(origin: &str) -> impl FnOnce(toml::de::Error) -> ConfigError + '_ {
    move |source| ConfigError::Parse {
        path: origin.to_string(),
        source,
    }
}

/// Reads `path`: `Ok(None)` when it does not exist.
fn read(path: &Path) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfigError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

impl HookConfig {
    /// Parses the `[hooks]` table of an `agent.toml` text; other tables
    /// are ignored. `origin` names the text in errors.
    pub fn parse(text: &str, origin: &str) -> Result<HookConfig, ConfigError> {
        toml::from_str::<HooksFile>(text)
            .map(|f| f.hooks)
            .map_err(parse_error(origin))
    }

    /// Reads `path`. A missing file is `Ok(None)`.
    pub fn try_load(path: impl AsRef<Path>) -> Result<Option<HookConfig>, ConfigError> {
        let path = path.as_ref();
        match read(path)? {
            Some(text) => Self::parse(&text, &path.display().to_string()).map(Some),
            None => Ok(None),
        }
    }

    /// Reads `path`; a missing file gives the defaults, and an unreadable or
    /// malformed one is logged and gives the defaults too.
    pub fn load(path: impl AsRef<Path>) -> HookConfig {
        match Self::try_load(path) {
            Ok(Some(c)) => c,
            Ok(None) => HookConfig::default(),
            Err(e) => {
                tracing::warn!(
                    "{}; using the default hooks",
                    snowflock_proto::error::chain(&e).trim_end()
                );
                HookConfig::default()
            }
        }
    }
}

impl BalloonConfig {
    /// Parses and checks the `[balloon]` table of an `agent.toml` text;
    /// other tables are ignored. `origin` names the text in errors.
    pub fn parse(text: &str, origin: &str) -> Result<BalloonConfig, ConfigError> {
        let b = toml::from_str::<BalloonFile>(text)
            .map(|f| f.balloon)
            .map_err(parse_error(origin))?;
        b.validate(origin)?;
        Ok(b)
    }

    /// Checks the ranges serde cannot; `origin` names the text in errors.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        match self.reporting_order {
            Some(o) if o > MAX_REPORTING_ORDER => Err(ConfigError::Invalid {
                path: origin.to_string(),
                message: format!(
                    "[balloon] reporting_order = {o} is out of range (0 to {MAX_REPORTING_ORDER})"
                ),
            }),
            _ => Ok(()),
        }
    }
}

impl NetworkConfig {
    /// Parses and checks the `[network]` table of an `agent.toml` text;
    /// other tables are ignored. `origin` names the text in errors.
    pub fn parse(text: &str, origin: &str) -> Result<NetworkConfig, ConfigError> {
        let n = toml::from_str::<NetworkFile>(text)
            .map(|f| f.network)
            .map_err(parse_error(origin))?;
        n.validate(origin)?;
        Ok(n)
    }

    /// Reads `path`. A missing file is `Ok(None)`.
    pub fn try_load(path: impl AsRef<Path>) -> Result<Option<NetworkConfig>, ConfigError> {
        let path = path.as_ref();
        match read(path)? {
            Some(text) => Self::parse(&text, &path.display().to_string()).map(Some),
            None => Ok(None),
        }
    }

    /// Checks the interface name the way the kernel does (`dev_valid_name`):
    /// 1 to [`MAX_INTERFACE_LEN`] bytes, not `.` or `..`, no `/`, `:` or
    /// white space. `origin` names the text in errors.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let i = &self.interface;
        let ok = !i.is_empty()
            && i.len() <= MAX_INTERFACE_LEN
            && i != "."
            && i != ".."
            && !i
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
        if ok {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                path: origin.to_string(),
                message: format!(
                    "[network] interface = {i:?} is not an interface name (1 to {MAX_INTERFACE_LEN} bytes, no '/', ':' or spaces)"
                ),
            })
        }
    }
}

impl Config {
    /// Parses a whole `agent.toml` text: the first error of any table fails.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Self::parse_tables(text, origin).into_config()
    }

    /// Parses each table of an `agent.toml` text on its own.
    pub fn parse_tables(text: &str, origin: &str) -> Tables {
        Tables {
            found: true,
            hooks: HookConfig::parse(text, origin),
            balloon: BalloonConfig::parse(text, origin),
            network: NetworkConfig::parse(text, origin),
        }
    }

    /// Reads `path` table by table. A missing file gives default tables
    /// and `found: false`; only an unreadable file is an error.
    pub fn load_tables(path: impl AsRef<Path>) -> Result<Tables, ConfigError> {
        let path = path.as_ref();
        Ok(match read(path)? {
            Some(text) => Self::parse_tables(&text, &path.display().to_string()),
            None => Tables {
                found: false,
                hooks: Ok(HookConfig::default()),
                balloon: Ok(BalloonConfig::default()),
                network: Ok(NetworkConfig::default()),
            },
        })
    }

    /// Reads `path`. A missing file is `Ok(None)`; any error in any table
    /// fails.
    pub fn try_load(path: impl AsRef<Path>) -> Result<Option<Config>, ConfigError> {
        let t = Self::load_tables(path)?;
        if !t.found {
            return Ok(None);
        }
        t.into_config().map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;

    #[test]
    fn defaults_when_file_or_keys_missing() {
        assert_eq!(
            HookConfig::default(),
            HookConfig {
                drop_caches: false,
                compact: false,
                malloc_trim: true
            }
        );
        assert_eq!(
            BalloonConfig::default(),
            BalloonConfig {
                free_page_reporting: true,
                reporting_order: None
            }
        );
        assert_eq!(HookConfig::parse("", "t").unwrap(), HookConfig::default());
        assert_eq!(
            HookConfig::parse("[hooks]\n", "t").unwrap(),
            HookConfig::default()
        );
        assert_eq!(Config::parse("", "t").unwrap(), Config::default());
        assert_eq!(
            Config::parse("[hooks]\n[balloon]\n", "t").unwrap(),
            Config::default()
        );
        let missing = "/nonexistent/snowflock/agent.toml";
        assert_eq!(HookConfig::load(missing), HookConfig::default());
        assert!(HookConfig::try_load(missing).unwrap().is_none());
        assert!(Config::try_load(missing).unwrap().is_none());
        let t = Config::load_tables(missing).unwrap();
        assert!(!t.found);
        assert_eq!(t.into_config().unwrap(), Config::default());
    }

    #[test]
    fn parses_keys_and_ignores_other_tables() {
        let c = HookConfig::parse(
            "[agent]\nlog = \"debug\"\n[hooks]\ndrop_caches = true\ncompact = true\nmalloc_trim = false\nfuture = 1\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            c,
            HookConfig {
                drop_caches: true,
                compact: true,
                malloc_trim: false
            }
        );
        let c = HookConfig::parse("[hooks]\ncompact = true\n", "t").unwrap();
        assert_eq!(
            c,
            HookConfig {
                drop_caches: false,
                compact: true,
                malloc_trim: true
            }
        );
    }

    #[test]
    fn parses_the_balloon_table() {
        let text = "[hooks]\ndrop_caches = true\n\n[balloon]\nfree_page_reporting = false\nreporting_order = 0\n";
        assert_eq!(
            Config::parse(text, "t").unwrap(),
            Config {
                hooks: HookConfig {
                    drop_caches: true,
                    ..HookConfig::default()
                },
                balloon: BalloonConfig {
                    free_page_reporting: false,
                    reporting_order: Some(0)
                },
                network: NetworkConfig::default(),
            }
        );
        // Each key on its own; the order's whole range.
        assert_eq!(
            BalloonConfig::parse("[balloon]\nfree_page_reporting = false\n", "t").unwrap(),
            BalloonConfig {
                free_page_reporting: false,
                reporting_order: None
            }
        );
        for o in 0..=MAX_REPORTING_ORDER {
            let b = BalloonConfig::parse(&format!("[balloon]\nreporting_order = {o}\n"), "t");
            assert_eq!(
                b.unwrap(),
                BalloonConfig {
                    free_page_reporting: true,
                    reporting_order: Some(o)
                }
            );
        }
        // Inline table syntax works like the section.
        assert_eq!(
            BalloonConfig::parse("balloon = { reporting_order = 3 }\n", "t")
                .unwrap()
                .reporting_order,
            Some(3)
        );
    }

    #[test]
    fn unknown_keys_and_tables_are_ignored() {
        let text = "[balloon]\nfree_page_reporting = false\nfree_page_hinting = true\n\
                    [balloon.future]\nx = 1\n[network]\nmtu = 9000\n";
        assert_eq!(
            Config::parse(text, "t").unwrap().balloon,
            BalloonConfig {
                free_page_reporting: false,
                reporting_order: None
            }
        );
    }

    #[test]
    fn out_of_range_order_is_rejected_clearly() {
        for bad in ["11", "64", "4294967295"] {
            let e =
                BalloonConfig::parse(&format!("[balloon]\nreporting_order = {bad}\n"), "a.toml")
                    .unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { .. }), "{e:?}");
            assert_eq!(
                e.to_string(),
                format!(
                    "Invalid configuration a.toml: [balloon] reporting_order = {bad} is out of range (0 to 10)"
                )
            );
        }
        // Negative or too large for u32: a type error.
        for bad in ["-1", "4294967296", "1.5", "\"0\""] {
            let e =
                BalloonConfig::parse(&format!("[balloon]\nreporting_order = {bad}\n"), "a.toml")
                    .unwrap_err();
            assert!(matches!(e, ConfigError::Parse { .. }), "{bad}: {e:?}");
            let chain = snowflock_proto::error::chain(&e);
            assert!(
                chain.starts_with("Malformed configuration a.toml: ")
                    && chain.contains("reporting_order"),
                "{chain}"
            );
        }
    }

    #[test]
    fn malformed_is_an_error_and_load_falls_back() {
        let e = HookConfig::parse("[hooks]\ndrop_caches = \"yes\"\n", "agent.toml").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }));
        assert_eq!(e.to_string(), "Malformed configuration agent.toml");
        assert!(HookConfig::parse("[hooks\n", "t").is_err());
        let e = BalloonConfig::parse("[balloon]\nfree_page_reporting = \"no\"\n", "agent.toml")
            .unwrap_err();
        let chain = snowflock_proto::error::chain(&e);
        assert!(
            chain.starts_with("Malformed configuration agent.toml: ")
                && chain.contains("free_page_reporting"),
            "{chain}"
        );
        assert!(BalloonConfig::parse("balloon = 3\n", "t").is_err());

        let dir = TempDir::new("config");
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, "hooks = 3\n").unwrap();
        assert!(HookConfig::try_load(&p).is_err());
        assert!(Config::try_load(&p).is_err());
        assert_eq!(HookConfig::load(&p), HookConfig::default());
        std::fs::write(&p, "[hooks]\ndrop_caches = true\n").unwrap();
        assert!(HookConfig::load(&p).drop_caches);
    }

    #[test]
    fn one_bad_table_does_not_spoil_the_other() {
        let dir = TempDir::new("tables");
        let p = dir.path().join("agent.toml");
        std::fs::write(
            &p,
            "[hooks]\ncompact = true\n[balloon]\nreporting_order = 12\n",
        )
        .unwrap();
        let t = Config::load_tables(&p).unwrap();
        assert!(t.found);
        assert!(t.hooks.as_ref().unwrap().compact);
        assert!(matches!(t.balloon, Err(ConfigError::Invalid { .. })));
        assert!(t.into_config().is_err());
        std::fs::write(&p, "[hooks]\ncompact = 1\n[balloon]\nreporting_order = 2\n").unwrap();
        let t = Config::load_tables(&p).unwrap();
        assert!(t.hooks.is_err());
        assert_eq!(t.balloon.unwrap().reporting_order, Some(2));
        // A syntax error spoils both.
        std::fs::write(&p, "[balloon\n").unwrap();
        let t = Config::load_tables(&p).unwrap();
        assert!(t.hooks.is_err() && t.balloon.is_err());
        // A directory cannot be read: the only load_tables error.
        assert!(matches!(
            Config::load_tables(dir.path()),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn parses_and_checks_the_network_table() {
        assert_eq!(NetworkConfig::default().interface, "eth0");
        assert_eq!(
            NetworkConfig::parse("[hooks]\ncompact = true\n", "t").unwrap(),
            NetworkConfig::default()
        );
        assert_eq!(
            NetworkConfig::parse("[network]\ninterface = \"enp0s2\"\nmtu = 9000\n", "t")
                .unwrap()
                .interface,
            "enp0s2"
        );
        assert_eq!(
            Config::parse("[network]\ninterface = \"ens3\"\n", "t")
                .unwrap()
                .network
                .interface,
            "ens3"
        );
        for bad in ["", ".", "..", "a/b", "eth0:1", "eth 0", "abcdefghijklmnop"] {
            let e = NetworkConfig::parse(&format!("[network]\ninterface = {bad:?}\n"), "a.toml")
                .unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { .. }), "{bad:?}: {e:?}");
            assert!(
                e.to_string()
                    .starts_with("Invalid configuration a.toml: [network] interface = "),
                "{e}"
            );
        }
        assert!(matches!(
            NetworkConfig::parse("[network]\ninterface = 0\n", "t"),
            Err(ConfigError::Parse { .. })
        ));
        // A bad [network] spoils neither of the other tables.
        let t = Config::parse_tables(
            "[hooks]\ncompact = true\n[network]\ninterface = \"\"\n",
            "t",
        );
        assert!(t.hooks.unwrap().compact);
        assert!(t.balloon.is_ok() && t.network.is_err());
        let missing = "/nonexistent/snowflock/agent.toml";
        assert!(NetworkConfig::try_load(missing).unwrap().is_none());
    }
}
