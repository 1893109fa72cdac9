//! Progress lines on stderr.

use std::time::Instant;

/// Progress lines on stderr: `[   1234 ms] WHO: MESSAGE`, the time counted
/// from the start of the program (clones inherit the start).
#[derive(Debug, Clone)]
pub struct Log {
    t0: Instant,
    who: String,
}

impl Log {
    pub fn new() -> Self {
        Log {
            t0: Instant::now(),
            who: "sf-swdemo".into(),
        }
    }

    /// The same clock under another name.
    pub fn as_who(&self, who: impl Into<String>) -> Self {
        Log {
            t0: self.t0,
            who: who.into(),
        }
    }

    pub fn ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    pub fn line(&self, m: impl std::fmt::Display) {
        eprintln!("[{:>7} ms] {}: {m}", self.ms(), self.who);
    }
}

impl Default for Log {
    fn default() -> Self {
        Self::new()
    }
}
