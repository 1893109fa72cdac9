//! `sf-memtest`: holds a patterned buffer so tests can check that process
//! memory is intact after a VM clone.
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
//! `ctl --sock PATH <verify|fill N|seed>` sends one command, prints the
//! answer and exits 0 when it starts with `ok`, `filled` or a digit.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
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

/// A buffer filled with the pattern of `seed`.
pub struct Held {
    buf: Vec<u64>,
    seed: u64,
}

impl Held {
    /// Allocates and fills `mib` MiB.
    pub fn new(mib: usize, seed: u64) -> Result<Held, String> {
        let words = mib.checked_mul(WORDS_PER_MIB).ok_or("Size overflows")?;
        let mut buf = Vec::new();
        buf.try_reserve_exact(words)
            .map_err(|e| format!("Cannot allocate {mib} MiB: {e}"))?;
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
pub fn hold(mib: usize, seed: u64, sock: &Path) -> Result<(), String> {
    let mut held = Held::new(mib, seed)?;
    let _ = std::fs::remove_file(sock);
    let l = UnixListener::bind(sock)
        .map_err(|e| format!("Cannot listen on {}: {e}", sock.display()))?;
    println!("ready {mib} MiB seed {seed} on {}", sock.display());
    let _ = std::io::stdout().flush();
    for conn in l.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
        let Ok(mut w) = conn.try_clone() else {
            continue;
        };
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { break };
            let answer = held.command(&line);
            if writeln!(w, "{answer}").is_err() {
                break;
            }
        }
    }
    Ok(())
}

/// `ctl`: sends one command; returns the answer line.
pub fn ctl(sock: &Path, command: &str) -> Result<String, String> {
    let mut s = UnixStream::connect(sock)
        .map_err(|e| format!("Cannot connect to {}: {e}", sock.display()))?;
    writeln!(s, "{command}").map_err(|e| format!("Cannot send: {e}"))?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("Cannot read the answer: {e}"))?;
    if line.is_empty() {
        return Err("No answer".into());
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
