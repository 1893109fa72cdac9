//! Deterministic synthetic protein data.
//!
//! Everything derives from a `u64` seed through SplitMix64, a generator
//! defined here (not a crate's), so the data never changes with a
//! dependency's version. Each database sequence has its own stream derived
//! from `(seed, id)`.
//!
//! Residues follow approximate natural amino-acid frequencies. A few
//! sequences ([`planted_ids`]) contain a mutated copy of a piece of the query
//! (substitutions, small insertions and deletions, at increasing rates), so
//! a search finds real hits with graded scores.

use crate::sw::ALPHABET;
use serde::{Deserialize, Serialize};

/// One database sequence. `seq` holds ASCII letters of [`ALPHABET`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protein {
    pub id: u32,
    pub name: String,
    pub seq: Vec<u8>,
}

/// SplitMix64.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// A stream for `(seed, stream, index)`: distinct inputs give unrelated
    /// streams.
    pub fn derive(seed: u64, stream: u64, index: u64) -> Self {
        let mut r = Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let a = r.next_u64();
        Rng(a ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        assert!(lo <= hi);
        lo + self.below((hi - lo) as u64 + 1) as usize
    }

    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    /// A residue drawn with background amino-acid frequencies.
    pub fn residue(&mut self) -> u8 {
        let mut x = self.below(FREQ_TOTAL as u64) as u32;
        for (i, &f) in FREQ.iter().enumerate() {
            if x < f {
                return ALPHABET[i];
            }
            x -= f;
        }
        unreachable!()
    }
}

/// Approximate natural frequencies (per mille) of the residues of
/// [`ALPHABET`], in its order.
const FREQ: [u32; 20] = [
    78, 51, 45, 54, 19, 43, 63, 74, 22, 51, 90, 57, 22, 39, 52, 71, 58, 13, 32, 64,
];
const FREQ_TOTAL: u32 = {
    let mut s = 0;
    let mut i = 0;
    while i < 20 {
        s += FREQ[i];
        i += 1;
    }
    s
};

const STREAM_QUERY: u64 = 1;
const STREAM_PLANT: u64 = 2;
const STREAM_SEQ: u64 = 3;

/// The query for `seed`: `len` residues.
pub fn generate_query(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::derive(seed, STREAM_QUERY, 0);
    (0..len).map(|_| r.residue()).collect()
}

/// How many sequences of a `count`-sequence database are planted with a
/// homolog of the query: 3 + 1 per 100 sequences, at most `count`.
pub fn planted_count(count: usize) -> usize {
    (3 + count / 100).min(count)
}

/// The ids of the planted sequences, ascending. Element `k` of the list
/// carries the `k`-th most similar copy (lowest mutation rate first).
pub fn planted_ids(seed: u64, count: usize) -> Vec<u32> {
    let n = planted_count(count);
    let mut r = Rng::derive(seed, STREAM_PLANT, 0);
    let mut ids: Vec<u32> = Vec::with_capacity(n);
    while ids.len() < n {
        let id = r.below(count as u64) as u32;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// A mutated copy of a piece of `query`: `rank` 0 is the most similar.
fn homolog(r: &mut Rng, query: &[u8], rank: usize, planted: usize) -> Vec<u8> {
    if query.is_empty() {
        return Vec::new();
    }
    // A piece of at least half the query.
    let piece = r.range(query.len().div_ceil(2), query.len());
    let start = r.range(0, query.len() - piece);
    // Substitution rate from 10% (rank 0) to 55% (last rank); indels 2% each.
    let sub = 10 + (45 * rank / planted.max(1)) as u64;
    let mut out = Vec::with_capacity(piece + piece / 10);
    for &q in &query[start..start + piece] {
        if r.chance(2) {
            continue;
        }
        out.push(if r.chance(sub) { r.residue() } else { q });
        if r.chance(2) {
            out.push(r.residue());
        }
    }
    out
}

/// The database for `seed`: `count` sequences with ids `0..count`, lengths
/// uniform in `min_len..=max_len`, the [`planted_ids`] holding homologs of
/// `query` (written over a random window of the sequence, cut to its
/// length). Names are `SFP` followed by the id in 5 digits.
pub fn generate_db(
    seed: u64,
    count: usize,
    min_len: usize,
    max_len: usize,
    query: &[u8],
) -> Vec<Protein> {
    assert!(min_len <= max_len, "min_len {min_len} > max_len {max_len}");
    assert!(count <= u32::MAX as usize);
    let planted = planted_ids(seed, count);
    (0..count as u32)
        .map(|id| {
            let mut r = Rng::derive(seed, STREAM_SEQ, id as u64);
            let len = r.range(min_len, max_len);
            let mut seq: Vec<u8> = (0..len).map(|_| r.residue()).collect();
            if let Some(rank) = planted.iter().position(|&p| p == id) {
                let mut h = homolog(&mut r, query, rank, planted.len());
                h.truncate(len);
                let at = r.range(0, len - h.len());
                seq[at..at + h.len()].copy_from_slice(&h);
            }
            Protein {
                id,
                name: format!("SFP{id:05}"),
                seq,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_in_the_seed() {
        let q = generate_query(7, 120);
        assert_eq!(q, generate_query(7, 120));
        assert_ne!(q, generate_query(8, 120));
        assert_eq!(q.len(), 120);
        let a = generate_db(7, 300, 50, 90, &q);
        assert_eq!(a, generate_db(7, 300, 50, 90, &q));
        assert_ne!(a, generate_db(8, 300, 50, 90, &q));
        // A sequence does not depend on how many come after it.
        let b = generate_db(7, 100, 50, 90, &q);
        let planted = planted_ids(7, 300);
        for p in &b {
            if !planted.contains(&p.id) && !planted_ids(7, 100).contains(&p.id) {
                assert_eq!(p, &a[p.id as usize]);
            }
        }
    }

    #[test]
    fn shapes_and_alphabet() {
        let q = generate_query(1, 120);
        let db = generate_db(1, 600, 150, 350, &q);
        assert_eq!(db.len(), 600);
        for (i, p) in db.iter().enumerate() {
            assert_eq!(p.id as usize, i);
            assert_eq!(p.name, format!("SFP{i:05}"));
            assert!((150..=350).contains(&p.seq.len()), "{}", p.seq.len());
            assert!(p.seq.iter().all(|b| ALPHABET.contains(b)));
        }
        // Fixed lengths, and tiny databases.
        assert!(generate_db(1, 10, 5, 5, &q)
            .iter()
            .all(|p| p.seq.len() == 5));
        assert!(generate_db(1, 0, 5, 5, &q).is_empty());
        assert_eq!(planted_ids(1, 2).len(), 2);
    }

    #[test]
    fn planted_sequences_are_the_best_hits() {
        let q = generate_query(42, 120);
        let db = generate_db(42, 600, 150, 350, &q);
        let planted = planted_ids(42, 600);
        assert_eq!(planted.len(), 9);
        let mut scores: Vec<(i32, u32)> = db
            .iter()
            .map(|p| (crate::sw::sw_score(&q, &p.seq), p.id))
            .collect();
        scores.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let best_random = scores.iter().find(|s| !planted.contains(&s.1)).unwrap().0;
        // The closest homologs score far above any random sequence.
        for &id in &planted[..5] {
            let s = scores.iter().find(|s| s.1 == id).unwrap().0;
            assert!(
                s > 2 * best_random,
                "planted {id} scores {s}, best random {best_random}"
            );
        }
    }

    #[test]
    fn residue_frequencies_are_roughly_right() {
        assert_eq!(FREQ_TOTAL, 998);
        let mut r = Rng::new(3);
        let mut n = [0u32; 20];
        for _ in 0..100_000 {
            let b = r.residue();
            n[ALPHABET.iter().position(|&a| a == b).unwrap()] += 1;
        }
        // L is the most common (9%), W the rarest (1.3%).
        assert!((8_000..10_000).contains(&n[10]), "{n:?}");
        assert!((1_000..1_600).contains(&n[17]), "{n:?}");
    }
}
