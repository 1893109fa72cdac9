//! In-guest avoidance heuristics, run just before a VM is cloned.
//!
//! A clone fetches its parent's memory lazily, page by page. Every page the
//! parent does not really need (free heap, clean page cache, fragmented
//! free lists) is a page a clone may fetch for nothing. SnowFlock patched the
//! guest kernel's page allocator to avoid those fetches; we use stock parts
//! instead:
//!
//! * **Free page reporting** (virtio-balloon `free-page-reporting=on`) makes
//!   the guest kernel report free pages to QEMU, which punches holes in the
//!   RAM file; the holes become the descriptor's zero map and are never
//!   fetched. That side is configured by the guest image and the host daemon,
//!   not here.
//! * **The hooks in this crate** return memory to the kernel right before a
//!   clone so that free page reporting can see it:
//!   * [`malloc_trim`]: `malloc_trim(0)` in the calling process. The client
//!     library (`libsnowflock`) runs it in the application before `sf_clone`,
//!     and the agent runs it on itself.
//!   * drop caches: `sync`, then `3` into `/proc/sys/vm/drop_caches` (the
//!     page cache is re-read from the lazily served disk only if needed).
//!   * compact: `1` into `/proc/sys/vm/compact_memory`, so that free memory
//!     forms whole reportable blocks.
//!
//! The agent runs [`run_agent_hooks`] with the sysadmin's [`HookConfig`],
//! read from the `[hooks]` table of `/etc/snowflock/agent.toml`:
//!
//! ```toml
//! [hooks]
//! drop_caches = false   # default
//! compact = false       # default
//! malloc_trim = true    # default
//! ```

use serde::Deserialize;
use std::fmt;
use std::path::Path;

/// Default location of the agent configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/snowflock/agent.toml";

const DROP_CACHES: &str = "/proc/sys/vm/drop_caches";
const COMPACT_MEMORY: &str = "/proc/sys/vm/compact_memory";

/// Which pre-clone hooks the agent runs.
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

/// Errors reading the hook configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("Cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a `[hooks]` key has the wrong type.
    #[error("Malformed configuration {path}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
}

/// The part of `agent.toml` this crate reads; other tables are ignored.
#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    hooks: HookConfig,
}

impl HookConfig {
    /// Parses the text of an `agent.toml`. `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<HookConfig, ConfigError> {
        toml::from_str::<ConfigFile>(text)
            .map(|f| f.hooks)
            .map_err(|source| ConfigError::Parse {
                path: origin.to_string(),
                source,
            })
    }

    /// Reads `path`. A missing file is `Ok(None)`.
    pub fn try_load(path: impl AsRef<Path>) -> Result<Option<HookConfig>, ConfigError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &origin).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ConfigError::Read {
                path: origin,
                source,
            }),
        }
    }

    /// Reads `path`; a missing file gives the defaults, and an unreadable or
    /// malformed one is logged and gives the defaults too.
    pub fn load(path: impl AsRef<Path>) -> HookConfig {
        match Self::try_load(path) {
            Ok(Some(c)) => c,
            Ok(None) => HookConfig::default(),
            Err(e) => {
                tracing::warn!("{}; using the default hooks", error_chain(&e));
                HookConfig::default()
            }
        }
    }
}

/// One pre-clone hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    DropCaches,
    Compact,
    MallocTrim,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::DropCaches => "drop_caches",
            Hook::Compact => "compact",
            Hook::MallocTrim => "malloc_trim",
        })
    }
}

/// What [`run_agent_hooks`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookReport {
    /// Hooks that ran and succeeded, in order.
    pub ran: Vec<Hook>,
    /// Hooks that ran and failed, with the reason.
    pub failed: Vec<(Hook, String)>,
}

impl HookReport {
    /// True when no hook failed.
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Runs the hooks enabled in `cfg`, in the order drop caches, compact,
/// malloc_trim. Failures are reported, never fatal: the clone goes on.
pub fn run_agent_hooks(cfg: &HookConfig) -> HookReport {
    let mut report = HookReport::default();
    let mut record = |hook: Hook, r: Result<(), String>| match r {
        Ok(()) => report.ran.push(hook),
        Err(e) => report.failed.push((hook, e)),
    };
    if cfg.drop_caches {
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        record(Hook::DropCaches, write_proc(DROP_CACHES, "3"));
    }
    if cfg.compact {
        record(Hook::Compact, write_proc(COMPACT_MEMORY, "1"));
    }
    if cfg.malloc_trim {
        // malloc_trim returns 0 when there was nothing to release: not an error.
        malloc_trim();
        record(Hook::MallocTrim, Ok(()));
    }
    report
}

fn write_proc(path: &str, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("Cannot write {value} to {path}: {e}"))
}

/// `malloc_trim(0)`: returns free heap memory of this process to the kernel.
/// True if memory was released. Always false where the C library has no
/// `malloc_trim` (non-glibc targets).
pub fn malloc_trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks this process's malloc arenas; it is
        // thread-safe in glibc and has no pointer arguments.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(c.to_string().trim_end());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(HookConfig::parse("", "t").unwrap(), HookConfig::default());
        assert_eq!(
            HookConfig::parse("[hooks]\n", "t").unwrap(),
            HookConfig::default()
        );
        assert_eq!(
            HookConfig::load("/nonexistent/snowflock/agent.toml"),
            HookConfig::default()
        );
        assert!(HookConfig::try_load("/nonexistent/snowflock/agent.toml")
            .unwrap()
            .is_none());
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
    fn malformed_is_an_error_and_load_falls_back() {
        let e = HookConfig::parse("[hooks]\ndrop_caches = \"yes\"\n", "agent.toml").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }));
        assert_eq!(e.to_string(), "Malformed configuration agent.toml");
        assert!(HookConfig::parse("[hooks\n", "t").is_err());

        let dir = std::env::temp_dir().join(format!("allocator-hooks-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("agent.toml");
        std::fs::write(&p, "hooks = 3\n").unwrap();
        assert!(HookConfig::try_load(&p).is_err());
        assert_eq!(HookConfig::load(&p), HookConfig::default());
        std::fs::write(&p, "[hooks]\ndrop_caches = true\n").unwrap();
        assert!(HookConfig::load(&p).drop_caches);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn malloc_trim_only_runs_what_is_enabled() {
        let r = run_agent_hooks(&HookConfig {
            drop_caches: false,
            compact: false,
            malloc_trim: true,
        });
        assert_eq!(r.ran, vec![Hook::MallocTrim]);
        assert!(r.ok());
        let r = run_agent_hooks(&HookConfig {
            drop_caches: false,
            compact: false,
            malloc_trim: false,
        });
        assert!(r.ran.is_empty() && r.ok());
        let _ = malloc_trim();
    }
}
