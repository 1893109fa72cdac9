//! In-guest avoidance heuristics: what keeps a clone from fetching pages
//! its parent does not really need.
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
//!   fetched. The guest side is the `virtio_balloon` driver and the
//!   `page_reporting_order` parameter, which [`apply_balloon`] sets from the
//!   `[balloon]` table ([`BalloonConfig`]).
//! * **The pre-clone hooks** ([`run_agent_hooks`], the `[hooks]` table,
//!   [`HookConfig`]) return memory to the kernel right before a clone so
//!   that free page reporting can see it:
//!   * [`malloc_trim`]: `malloc_trim(0)` in the calling process. The client
//!     library (`libsnowflock`) runs it in the application before `sf_clone`,
//!     and the agent runs it on itself.
//!   * drop caches: `sync`, then `3` into `/proc/sys/vm/drop_caches` (the
//!     page cache is re-read from the lazily served disk only if needed).
//!   * compact: `1` into `/proc/sys/vm/compact_memory`, so that free memory
//!     forms whole reportable blocks.
//!
//! Both tables live in `/etc/snowflock/agent.toml` ([`config`] has the
//! format; `docs/avoidance.md` is the sysadmin's guide), next to the
//! agent's `[network]` table ([`NetworkConfig`]).

pub mod balloon;
pub mod config;

pub use balloon::{apply_balloon, BalloonReport, BalloonStep, SYSFS};
pub use config::{
    BalloonConfig, Config, ConfigError, HookConfig, NetworkConfig, Tables, DEFAULT_CONFIG_PATH,
    DEFAULT_INTERFACE, MAX_INTERFACE_LEN, MAX_REPORTING_ORDER,
};

use std::fmt;

const DROP_CACHES: &str = "/proc/sys/vm/drop_caches";
const COMPACT_MEMORY: &str = "/proc/sys/vm/compact_memory";

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

/// Why a pre-clone hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// Writing its trigger value to a `/proc/sys/vm` file failed.
    #[error("Cannot write {value} to {path}: {source}")]
    WriteProc {
        /// The `/proc` file.
        path: &'static str,
        /// The value written.
        value: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// What [`run_agent_hooks`] did.
#[derive(Debug, Default)]
pub struct HookReport {
    /// Hooks that ran and succeeded, in order.
    pub ran: Vec<Hook>,
    /// Hooks that ran and failed, with the reason.
    pub failed: Vec<(Hook, HookError)>,
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
    let mut record = |hook: Hook, r: Result<(), HookError>| match r {
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

fn write_proc(path: &'static str, value: &'static str) -> Result<(), HookError> {
    std::fs::write(path, value).map_err(|source| HookError::WriteProc {
        path,
        value,
        source,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

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

#[cfg(test)]
pub(crate) mod test_util {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A directory under the system temp dir, removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "allocator-hooks-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
