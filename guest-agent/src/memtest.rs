//! `sf-memtest`: test helpers that check process memory across a VM clone.
//!
//! ## `hold`: a fixed pattern
//!
//! `hold --mib N --seed S --sock PATH` fills N MiB with an xorshift64
//! sequence seeded from S (one value per 8-byte word) and serves PATH with
//! line commands:
//!
//! | command | answer |
//! |---|---|
//! | `verify` | `ok <seed> <checksum>` or `mismatch <seed> at <byte offset>` |
//! | `fill <seed>` | `filled <seed>` |
//! | `seed` | `<seed>` |
//!
//! The checksum is FNV-1a (64-bit, per word) over the buffer, in hex.
//! `ctl --sock PATH <verify|fill N|seed|status>` sends one command, prints
//! the answer and exits 0 when it starts with `ok`, `filled` or a digit.
//!
//! ## `scribble`: a writer that checks its own past writes
//!
//! `scribble --mib N --sock PATH` allocates N MiB as `n` u64 words and a
//! writer thread loops forever: step `seq` (1, 2, 3, ...) goes to word
//! `seq % n`, which must hold exactly what the writer put there one pass
//! earlier, `seq - n` (0 on the first pass); then it writes `seq`. Any other
//! value is a mismatch: the first (byte offset, expected, found) is kept,
//! all are counted, and the writer goes on (the word is rewritten, so the
//! next pass expects the new value). A pass is `n` steps.
//!
//! A clone resumes with its parent's registers and memory as they were at
//! the clone point, so its writer carries on seamlessly. If the clone's
//! memory mixed in a page from before the clone point (a stale fetch) or
//! from after it (a page the parent wrote later), the words of that page are
//! not what the clone's writer last wrote there: the clone reports a
//! mismatch within one pass.
//!
//! | command | answer |
//! |---|---|
//! | `status` | `ok passes=<P> seq=<S>` when no mismatch was seen, else `mismatch offset=<byte offset> expected=<e> found=<f> count=<c> passes=<P> seq=<S>` (the first mismatch; `c` counts all) |
//!
//! `seq` is the last value written, `passes` the completed passes
//! (`seq / n`). A test records `passes` at the clone point and waits until
//! each side has done at least one more full pass before trusting `ok`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WORDS_PER_MIB: usize = (1 << 20) / 8;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The pattern generator: xorshift64 from a splitmix64-scrambled seed.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Pattern(if z == 0 { 1 } else { z })
    }
}

impl Iterator for Pattern {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        Some(x)
    }
}

/// What can go wrong in `hold`, `scribble` and `ctl`.
#[derive(Debug, thiserror::Error)]
pub enum MemtestError {
    #[error("Size overflows")]
    SizeOverflows,
    #[error("The buffer must hold at least one word")]
    EmptyBuffer,
    #[error("{0}")]
    Reserve(#[source] std::collections::TryReserveError),
    #[error("Cannot allocate {mib} MiB: {source}")]
    Alloc {
        mib: usize,
        source: Box<MemtestError>,
    },
    #[error("Cannot listen on {}: {source}", path.display())]
    Listen {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("Cannot start the writer: {0}")]
    SpawnWriter(#[source] std::io::Error),
    #[error("Cannot connect to {}: {source}", path.display())]
    Connect {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("Cannot send: {0}")]
    Send(#[source] std::io::Error),
    #[error("Cannot read the answer: {0}")]
    Read(#[source] std::io::Error),
    #[error("No answer")]
    NoAnswer,
}

/// A buffer filled with the pattern of `seed`.
pub struct Held {
    buf: Vec<u64>,
    seed: u64,
}

impl Held {
    /// Allocates and fills `mib` MiB.
    pub fn new(mib: usize, seed: u64) -> Result<Held, MemtestError> {
        let words = mib
            .checked_mul(WORDS_PER_MIB)
            .ok_or(MemtestError::SizeOverflows)?;
        let mut buf = Vec::new();
        buf.try_reserve_exact(words)
            .map_err(|e| MemtestError::Alloc {
                mib,
                source: Box::new(MemtestError::Reserve(e)),
            })?;
        buf.resize(words, 0);
        let mut h = Held { buf, seed };
        h.fill(seed);
        Ok(h)
    }

    /// Refills with the pattern of `seed`.
    pub fn fill(&mut self, seed: u64) {
        for (w, v) in self.buf.iter_mut().zip(Pattern::new(seed)) {
            *w = v;
        }
        self.seed = seed;
    }

    /// Checks the whole buffer: `Ok(checksum)` or `Err(byte offset)` of the
    /// first wrong word.
    pub fn verify(&self) -> Result<u64, usize> {
        let mut h = FNV_OFFSET;
        for (i, (w, v)) in self.buf.iter().zip(Pattern::new(self.seed)).enumerate() {
            if *w != v {
                return Err(i * 8);
            }
            h = (h ^ w).wrapping_mul(FNV_PRIME);
        }
        Ok(h)
    }

    /// Answers one command line.
    pub fn command(&mut self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["verify"] => match self.verify() {
                Ok(sum) => format!("ok {} {sum:016x}", self.seed),
                Err(off) => format!("mismatch {} at {off}", self.seed),
            },
            ["fill", s] => match s.parse::<u64>() {
                Ok(seed) => {
                    self.fill(seed);
                    format!("filled {seed}")
                }
                Err(_) => format!("error bad seed {s:?}"),
            },
            ["seed"] => self.seed.to_string(),
            _ => format!("error unknown command {line:?}"),
        }
    }

    #[cfg(test)]
    fn corrupt(&mut self, word: usize) {
        self.buf[word] ^= 1;
    }
}

/// `hold`: fills the buffer, then serves `sock` forever.
pub fn hold(mib: usize, seed: u64, sock: &Path) -> Result<(), MemtestError> {
    let mut held = Held::new(mib, seed)?;
    let l = listen(sock)?;
    println!("ready {mib} MiB seed {seed} on {}", sock.display());
    let _ = std::io::stdout().flush();
    serve(l, |line| held.command(line));
    Ok(())
}

/// Binds `sock`, replacing a stale one.
fn listen(sock: &Path) -> Result<UnixListener, MemtestError> {
    let _ = std::fs::remove_file(sock);
    UnixListener::bind(sock).map_err(|source| MemtestError::Listen {
        path: sock.to_path_buf(),
        source,
    })
}

/// Answers line commands on `l` forever, one connection at a time.
fn serve(l: UnixListener, mut answer: impl FnMut(&str) -> String) {
    for conn in l.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
        let Ok(mut w) = conn.try_clone() else {
            continue;
        };
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { break };
            if writeln!(w, "{}", answer(&line)).is_err() {
                break;
            }
        }
    }
}

/// The first word [`Scribbler`] found with a value it did not write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Byte offset of the word in the buffer.
    pub offset: usize,
    /// What the writer put there one pass earlier (0 on the first pass).
    pub expected: u64,
    pub found: u64,
}

/// A snapshot of a [`Scribbler`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScribbleStatus {
    /// The last value written (0 before the first step).
    pub seq: u64,
    /// Completed passes over the whole buffer.
    pub passes: u64,
    /// The first mismatch, if any.
    pub first: Option<Mismatch>,
    /// Mismatches seen, in all.
    pub count: u64,
}

impl ScribbleStatus {
    /// The answer to `status`.
    pub fn answer(&self) -> String {
        let ScribbleStatus {
            seq,
            passes,
            first,
            count,
        } = *self;
        match first {
            None => format!("ok passes={passes} seq={seq}"),
            Some(m) => format!(
                "mismatch offset={} expected={} found={} count={count} passes={passes} seq={seq}",
                m.offset, m.expected, m.found
            ),
        }
    }
}

/// The self-checking writer of `scribble`; see the module doc.
pub struct Scribbler {
    buf: Vec<u64>,
    /// The last value written.
    seq: u64,
    first: Option<Mismatch>,
    count: u64,
}

impl Scribbler {
    /// Allocates `mib` MiB of zeroed words.
    pub fn new(mib: usize) -> Result<Scribbler, MemtestError> {
        let words = mib
            .checked_mul(WORDS_PER_MIB)
            .ok_or(MemtestError::SizeOverflows)?;
        Self::with_words(words).map_err(|e| MemtestError::Alloc {
            mib,
            source: Box::new(e),
        })
    }

    /// Allocates `words` zeroed words (at least one).
    pub fn with_words(words: usize) -> Result<Scribbler, MemtestError> {
        if words == 0 {
            return Err(MemtestError::EmptyBuffer);
        }
        let mut buf = Vec::new();
        buf.try_reserve_exact(words)
            .map_err(MemtestError::Reserve)?;
        buf.resize(words, 0);
        Ok(Scribbler {
            buf,
            seq: 0,
            first: None,
            count: 0,
        })
    }

    /// Runs `steps` steps: check word `seq % n` holds `seq - n` (0 on the
    /// first pass), note a mismatch if not, write `seq`.
    pub fn run(&mut self, steps: u64) {
        let n = self.buf.len() as u64;
        let buf = self.buf.as_mut_slice();
        let mut seq = self.seq;
        let mut i = ((seq + 1) % n) as usize;
        let (mut first, mut count) = (self.first, self.count);
        for _ in 0..steps {
            seq += 1;
            let expected = seq.saturating_sub(n);
            let word = &mut buf[i];
            // Volatile: each check is a real load and each write a real
            // store, whatever the optimiser could prove about the buffer.
            // SAFETY: `word` is a valid, aligned, exclusive reference.
            let found = unsafe { std::ptr::read_volatile(word) };
            if found != expected {
                count += 1;
                first.get_or_insert(Mismatch {
                    offset: i * 8,
                    expected,
                    found,
                });
            }
            // SAFETY: as above.
            unsafe { std::ptr::write_volatile(word, seq) };
            i += 1;
            if i == buf.len() {
                i = 0;
            }
        }
        self.seq = seq;
        self.first = first;
        self.count = count;
    }

    /// Where the writer is.
    pub fn status(&self) -> ScribbleStatus {
        ScribbleStatus {
            seq: self.seq,
            passes: self.seq / self.buf.len() as u64,
            first: self.first,
            count: self.count,
        }
    }

    /// Number of words.
    pub fn words(&self) -> usize {
        self.buf.len()
    }

    /// A write from outside the writer's sequence (tests).
    #[cfg(test)]
    fn poke(&mut self, word: usize, value: u64) {
        self.buf[word] = value;
    }
}

/// Steps between two publications of the writer's status: small enough
/// that `status` is fresh (well under a millisecond natively, some tens
/// under TCG), large enough that the lock costs nothing.
const SCRIBBLE_BATCH: u64 = 1 << 16;

/// Answers one `scribble` command line.
pub fn scribble_command(status: &ScribbleStatus, line: &str) -> String {
    match line.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["status"] => status.answer(),
        _ => format!("error unknown command {line:?}"),
    }
}

/// `scribble`: starts the writer on `mib` MiB, then serves `sock` forever.
pub fn scribble(mib: usize, sock: &Path) -> Result<(), MemtestError> {
    let s = Scribbler::new(mib)?;
    let l = listen(sock)?;
    println!(
        "ready scribble {mib} MiB ({} words) on {}",
        s.words(),
        sock.display()
    );
    let _ = std::io::stdout().flush();
    serve_scribble(s, l, Arc::new(AtomicBool::new(false)))
}

/// Runs the writer on its own thread until `stop`, and serves `l`.
fn serve_scribble(
    mut s: Scribbler,
    l: UnixListener,
    stop: Arc<AtomicBool>,
) -> Result<(), MemtestError> {
    let status = Arc::new(Mutex::new(s.status()));
    let shared = status.clone();
    std::thread::Builder::new()
        .name("scribbler".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                s.run(SCRIBBLE_BATCH);
                let now = s.status();
                *shared.lock().unwrap_or_else(|p| p.into_inner()) = now;
            }
        })
        .map_err(MemtestError::SpawnWriter)?;
    serve(l, |line| {
        let now = *status.lock().unwrap_or_else(|p| p.into_inner());
        scribble_command(&now, line)
    });
    Ok(())
}

/// `ctl`: sends one command; returns the answer line.
pub fn ctl(sock: &Path, command: &str) -> Result<String, MemtestError> {
    let mut s = UnixStream::connect(sock).map_err(|source| MemtestError::Connect {
        path: sock.to_path_buf(),
        source,
    })?;
    writeln!(s, "{command}").map_err(MemtestError::Send)?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(MemtestError::Read)?;
    if line.is_empty() {
        return Err(MemtestError::NoAnswer);
    }
    Ok(line.trim_end().to_string())
}

/// True for answers that mean success.
pub fn answer_ok(a: &str) -> bool {
    a.starts_with("ok") || a.starts_with("filled") || a.starts_with(|c: char| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_verify_and_detect_corruption() {
        let mut h = Held::new(1, 42).unwrap();
        let a = h.command("verify");
        assert!(a.starts_with("ok 42 "), "{a}");
        assert_eq!(h.command("seed"), "42");
        assert_eq!(h.command("fill 7"), "filled 7");
        let b = h.command("verify");
        assert!(b.starts_with("ok 7 ") && a[6..] != b[5..], "{a} {b}");
        h.corrupt(1000);
        assert_eq!(h.command("verify"), "mismatch 7 at 8000");
        assert!(h.command("bogus").starts_with("error"));
        assert!(h.command("fill x").starts_with("error"));
        // Seeds 0 and 1 give distinct, non-degenerate patterns.
        let z: Vec<u64> = Pattern::new(0).take(3).collect();
        let o: Vec<u64> = Pattern::new(1).take(3).collect();
        assert!(z != o && z.iter().all(|&v| v != 0));
        assert!(answer_ok("ok 1 ff") && answer_ok("filled 3") && answer_ok("12"));
        assert!(!answer_ok("mismatch 1 at 0") && !answer_ok("error x"));
    }

    #[test]
    fn scribbler_is_ok_through_many_passes() {
        let mut s = Scribbler::with_words(1000).unwrap();
        assert_eq!(s.status().answer(), "ok passes=0 seq=0");
        s.run(999);
        assert_eq!(s.status().answer(), "ok passes=0 seq=999");
        s.run(1);
        assert_eq!(s.status().answer(), "ok passes=1 seq=1000");
        // Uneven batches cross pass boundaries anywhere.
        for steps in [1, 7, 999, 1000, 1001, 12345] {
            s.run(steps);
        }
        let st = s.status();
        assert_eq!(st.seq, 1000 + 1 + 7 + 999 + 1000 + 1001 + 12345);
        assert_eq!(st.passes, st.seq / 1000);
        assert_eq!((st.first, st.count), (None, 0), "{st:?}");
        assert!(answer_ok(&st.answer()));
        // The buffer holds exactly the last pass.
        for (i, w) in s.buf.iter().enumerate() {
            let last = st.seq - (st.seq + 1000 - i as u64) % 1000;
            assert_eq!(*w, last, "word {i}");
        }
        // One word: every step checks the previous one.
        let mut one = Scribbler::with_words(1).unwrap();
        one.run(100);
        assert_eq!(one.status().answer(), "ok passes=100 seq=100");
        assert!(Scribbler::with_words(0).is_err());
    }

    #[test]
    fn scribbler_reports_a_foreign_write_and_goes_on() {
        let mut s = Scribbler::with_words(100).unwrap();
        s.run(250); // word i last got 200 + i (i <= 50) or 100 + i
        s.poke(60, 7); // word 60 holds 160, checked at seq 260
        s.run(5);
        assert_eq!(s.status().answer(), "ok passes=2 seq=255");
        s.run(100);
        let st = s.status();
        assert_eq!(
            st.first,
            Some(Mismatch {
                offset: 60 * 8,
                expected: 160,
                found: 7
            })
        );
        assert_eq!(
            st.answer(),
            "mismatch offset=480 expected=160 found=7 count=1 passes=3 seq=355"
        );
        assert!(!answer_ok(&st.answer()));
        // The writer rewrote the word: later passes are clean again.
        s.run(1000);
        assert_eq!(s.status().count, 1);
        // A word "from the future" (what the parent wrote after the clone
        // point) and a stale one (from before it) are both caught, and the
        // first mismatch is kept while the count goes up.
        assert_eq!(s.status().seq, 1355); // word 70 holds 1270, word 80 1280
        s.poke(70, 1370);
        s.poke(80, 1180);
        s.run(100);
        let st = s.status();
        assert_eq!((st.count, st.seq), (3, 1455), "{st:?}");
        assert_eq!(st.first.unwrap().offset, 480);
        // First pass: a non-zero word is foreign too.
        let mut f = Scribbler::with_words(10).unwrap();
        f.poke(3, 1);
        f.run(10);
        assert_eq!(
            f.status().answer(),
            "mismatch offset=24 expected=0 found=1 count=1 passes=1 seq=10"
        );
    }

    #[test]
    fn scribble_serves_status_over_a_socket() {
        let sock = std::env::temp_dir().join(format!("sf-scribble-{}.sock", std::process::id()));
        let l = listen(&sock).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let s = Scribbler::new(1).unwrap();
        std::thread::spawn(move || serve_scribble(s, l, st));
        let status = |a: &str| -> (u64, u64) {
            let kv: std::collections::HashMap<&str, u64> = a
                .split_whitespace()
                .skip(1)
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k, v.parse().unwrap()))
                .collect();
            (kv["passes"], kv["seq"])
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut last = (0, 0);
        while last.0 < 3 {
            assert!(std::time::Instant::now() < deadline, "{last:?}");
            let a = ctl(&sock, "status").unwrap();
            assert!(a.starts_with("ok passes="), "{a}");
            let now = status(&a);
            assert!(
                now.1 >= last.1 && now.0 == now.1 / WORDS_PER_MIB as u64,
                "{a}"
            );
            last = now;
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(ctl(&sock, "bogus").unwrap().starts_with("error"));
        stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&sock);
    }

    #[test]
    fn serves_and_controls_over_a_socket() {
        let sock = std::env::temp_dir().join(format!("sf-memtest-{}.sock", std::process::id()));
        let p = sock.clone();
        std::thread::spawn(move || hold(1, 5, &p));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let first = loop {
            match ctl(&sock, "seed") {
                Ok(a) => break a,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(first, "5");
        assert_eq!(ctl(&sock, "fill 9").unwrap(), "filled 9");
        assert!(ctl(&sock, "verify").unwrap().starts_with("ok 9 "));
        let _ = std::fs::remove_file(&sock);
    }
}
