//! Smith-Waterman local alignment scores with BLOSUM62 and affine gaps.
//!
//! Gotoh's recurrences, computed row by row over the database sequence with
//! two arrays the length of the query (O(m) memory), in `i32`:
//!
//! ```text
//! E[i][j] = max(E[i-1][j] - extend, H[i-1][j] - open)   gap in the query
//! F[i][j] = max(F[i][j-1] - extend, H[i][j-1] - open)   gap in the subject
//! H[i][j] = max(0, H[i-1][j-1] + s(a_i, q_j), E[i][j], F[i][j])
//! ```
//!
//! A gap of length `L` costs `open + (L - 1) * extend` (11 for the first
//! residue, 1 for each further one with the defaults).

/// The 20 amino acids, in BLOSUM62's row order.
pub const ALPHABET: &[u8; 20] = b"ARNDCQEGHILKMFPSTWYV";

/// Cost of the first residue of a gap.
pub const GAP_OPEN: i32 = 11;
/// Cost of each further residue of a gap.
pub const GAP_EXTEND: i32 = 1;

/// Score of any pair involving a byte outside [`ALPHABET`] (BLOSUM62's `*`).
pub const UNKNOWN_SCORE: i32 = -4;

/// BLOSUM62 over [`ALPHABET`] (NCBI's matrix, rows and columns A R N D C Q E
/// G H I L K M F P S T W Y V).
#[rustfmt::skip]
pub const BLOSUM62: [[i8; 20]; 20] = [
    //A   R   N   D   C   Q   E   G   H   I   L   K   M   F   P   S   T   W   Y   V
    [ 4, -1, -2, -2,  0, -1, -1,  0, -2, -1, -1, -1, -1, -2, -1,  1,  0, -3, -2,  0], // A
    [-1,  5,  0, -2, -3,  1,  0, -2,  0, -3, -2,  2, -1, -3, -2, -1, -1, -3, -2, -3], // R
    [-2,  0,  6,  1, -3,  0,  0,  0,  1, -3, -3,  0, -2, -3, -2,  1,  0, -4, -2, -3], // N
    [-2, -2,  1,  6, -3,  0,  2, -1, -1, -3, -4, -1, -3, -3, -1,  0, -1, -4, -3, -3], // D
    [ 0, -3, -3, -3,  9, -3, -4, -3, -3, -1, -1, -3, -1, -2, -3, -1, -1, -2, -2, -1], // C
    [-1,  1,  0,  0, -3,  5,  2, -2,  0, -3, -2,  1,  0, -3, -1,  0, -1, -2, -1, -2], // Q
    [-1,  0,  0,  2, -4,  2,  5, -2,  0, -3, -3,  1, -2, -3, -1,  0, -1, -3, -2, -2], // E
    [ 0, -2,  0, -1, -3, -2, -2,  6, -2, -4, -4, -2, -3, -3, -2,  0, -2, -2, -3, -3], // G
    [-2,  0,  1, -1, -3,  0,  0, -2,  8, -3, -3, -1, -2, -1, -2, -1, -2, -2,  2, -3], // H
    [-1, -3, -3, -3, -1, -3, -3, -4, -3,  4,  2, -3,  1,  0, -3, -2, -1, -3, -1,  3], // I
    [-1, -2, -3, -4, -1, -2, -3, -4, -3,  2,  4, -2,  2,  0, -3, -2, -1, -2, -1,  1], // L
    [-1,  2,  0, -1, -3,  1,  1, -2, -1, -3, -2,  5, -1, -3, -1,  0, -1, -3, -2, -2], // K
    [-1, -1, -2, -3, -1,  0, -2, -3, -2,  1,  2, -1,  5,  0, -2, -1, -1, -1, -1,  1], // M
    [-2, -3, -3, -3, -2, -3, -3, -3, -1,  0,  0, -3,  0,  6, -4, -2, -2,  1,  3, -1], // F
    [-1, -2, -2, -1, -3, -1, -1, -2, -2, -3, -3, -1, -2, -4,  7, -1, -1, -4, -3, -2], // P
    [ 1, -1,  1,  0, -1,  0,  0,  0, -1, -2, -2,  0, -1, -2, -1,  4,  1, -3, -2, -2], // S
    [ 0, -1,  0, -1, -1, -1, -1, -2, -2, -1, -1, -1, -1, -2, -1,  1,  5, -2, -2,  0], // T
    [-3, -3, -4, -4, -2, -2, -3, -2, -2, -3, -2, -3, -1,  1, -4, -3, -2, 11,  2, -3], // W
    [-2, -2, -2, -3, -2, -1, -2, -3,  2, -1, -1, -2, -1,  3, -3, -2, -2,  2,  7, -1], // Y
    [ 0, -3, -3, -3, -1, -2, -2, -3, -3,  3,  1, -2,  1, -1, -2, -2,  0, -3, -1,  4], // V
];

/// Index of each byte in [`ALPHABET`] (upper or lower case), 20 for others.
const INDEX: [u8; 256] = {
    let mut t = [20u8; 256];
    let mut i = 0;
    while i < 20 {
        t[ALPHABET[i] as usize] = i as u8;
        t[ALPHABET[i].to_ascii_lowercase() as usize] = i as u8;
        i += 1;
    }
    t
};

/// Index of `b` in [`ALPHABET`] (case-insensitive), `None` for other bytes.
pub fn aa_index(b: u8) -> Option<usize> {
    let i = INDEX[b as usize] as usize;
    (i < 20).then_some(i)
}

/// BLOSUM62 score of two residues; [`UNKNOWN_SCORE`] if either is not one of
/// the 20 amino acids.
pub fn blosum62(a: u8, b: u8) -> i32 {
    match (aa_index(a), aa_index(b)) {
        (Some(i), Some(j)) => BLOSUM62[i][j] as i32,
        _ => UNKNOWN_SCORE,
    }
}

/// A query prepared for scoring many subjects: for each residue class
/// (20 amino acids + unknown), the score against every query position.
#[derive(Debug, Clone)]
pub struct Profile {
    len: usize,
    rows: Vec<i32>,
}

impl Profile {
    pub fn new(query: &[u8]) -> Self {
        let len = query.len();
        let mut rows = vec![UNKNOWN_SCORE; 21 * len];
        for (a, row) in rows.chunks_mut(len.max(1)).take(20).enumerate() {
            for (j, &q) in query.iter().enumerate() {
                row[j] = blosum62(ALPHABET[a], q);
            }
        }
        Profile { len, rows }
    }

    /// Query length.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn row(&self, subject_residue: u8) -> &[i32] {
        let a = INDEX[subject_residue as usize] as usize;
        &self.rows[a * self.len..(a + 1) * self.len]
    }

    /// Best local alignment score of the query against `subject`.
    pub fn score(&self, subject: &[u8]) -> i32 {
        sw_score_with(self, subject, GAP_OPEN, GAP_EXTEND)
    }
}

/// Far below any reachable score, and safe to subtract a gap cost from.
const NEG: i32 = i32::MIN / 4;

/// Best Smith-Waterman score of `profile`'s query against `subject` with the
/// given gap costs (both > 0).
pub fn sw_score_with(profile: &Profile, subject: &[u8], open: i32, extend: i32) -> i32 {
    let m = profile.len();
    if m == 0 || subject.is_empty() {
        return 0;
    }
    // h[j] = H[i-1][j+1] before row i is computed, H[i][j+1] after.
    let mut h = vec![0i32; m];
    let mut e = vec![NEG; m];
    let mut best = 0;
    for &a in subject {
        let sc = profile.row(a);
        let mut diag = 0; // H[i-1][0]
        let mut f = NEG;
        let mut left = 0; // H[i][0]
        for j in 0..m {
            let up = h[j];
            let ej = (e[j] - extend).max(up - open);
            e[j] = ej;
            f = (f - extend).max(left - open);
            let v = (diag + sc[j]).max(ej).max(f).max(0);
            diag = up;
            h[j] = v;
            left = v;
            best = best.max(v);
        }
    }
    best
}

/// Best Smith-Waterman score of `query` against `subject` with BLOSUM62 and
/// gaps of [`GAP_OPEN`] / [`GAP_EXTEND`].
pub fn sw_score(query: &[u8], subject: &[u8]) -> i32 {
    Profile::new(query).score(subject)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Textbook O(n^3) formulation (every gap length tried explicitly), full
    /// matrix: an independent check of the Gotoh recurrences.
    fn reference(q: &[u8], s: &[u8]) -> i32 {
        let (n, m) = (s.len(), q.len());
        let mut h = vec![vec![0i32; m + 1]; n + 1];
        let mut best = 0;
        for i in 1..=n {
            for j in 1..=m {
                let mut v = 0.max(h[i - 1][j - 1] + blosum62(s[i - 1], q[j - 1]));
                for k in 1..=i {
                    v = v.max(h[i - k][j] - GAP_OPEN - (k as i32 - 1) * GAP_EXTEND);
                }
                for k in 1..=j {
                    v = v.max(h[i][j - k] - GAP_OPEN - (k as i32 - 1) * GAP_EXTEND);
                }
                h[i][j] = v;
                best = best.max(v);
            }
        }
        best
    }

    #[test]
    fn matrix_is_symmetric_with_known_entries() {
        for i in 0..20 {
            for j in 0..20 {
                assert_eq!(
                    BLOSUM62[i][j], BLOSUM62[j][i],
                    "{} {}",
                    ALPHABET[i] as char, ALPHABET[j] as char
                );
            }
        }
        assert_eq!(blosum62(b'W', b'W'), 11);
        assert_eq!(blosum62(b'C', b'C'), 9);
        assert_eq!(blosum62(b'A', b'A'), 4);
        assert_eq!(blosum62(b'W', b'P'), -4);
        assert_eq!(blosum62(b'I', b'V'), 3);
        assert_eq!(blosum62(b'h', b'Y'), 2);
        assert_eq!(blosum62(b'X', b'A'), UNKNOWN_SCORE);
        let diag: i32 = (0..20).map(|i| BLOSUM62[i][i] as i32).sum();
        assert_eq!(
            diag,
            4 + 5 + 6 + 6 + 9 + 5 + 5 + 6 + 8 + 4 + 4 + 5 + 5 + 6 + 7 + 4 + 5 + 11 + 7 + 4
        );
    }

    #[test]
    fn identical_sequences_score_the_diagonal_sum() {
        // All diagonal entries are positive, so the whole sequence aligns.
        assert_eq!(sw_score(ALPHABET, ALPHABET), 116);
        assert_eq!(sw_score(b"W", b"W"), 11);
        assert_eq!(
            sw_score(b"HEAGAWGHEE", b"HEAGAWGHEE"),
            8 + 5 + 4 + 6 + 4 + 11 + 6 + 8 + 5 + 5
        );
    }

    #[test]
    fn small_hand_checked_scores() {
        // Nothing positive to align.
        assert_eq!(sw_score(b"", b"ACD"), 0);
        assert_eq!(sw_score(b"W", b"P"), 0);
        // The best local piece: "WW" inside unrelated residues (P vs W = -4).
        assert_eq!(sw_score(b"PPWWPP", b"GWWG"), 22);
        // Mismatch inside a match: 44 - 3 (W/A) + 33 = 74 beats either half.
        assert_eq!(sw_score(b"WWWWWWWW", b"WWWWAWWW"), 74);
        // One-residue gap: 8 W aligned, minus open 11 = 77 > ungapped 74.
        assert_eq!(sw_score(b"WWWWWWWW", b"WWWWAWWWW"), 77);
        // Two-residue gap: 88 - (11 + 1) = 76; the gap is on either side.
        assert_eq!(sw_score(b"WWWWWWWW", b"WWWWAAWWWW"), 76);
        assert_eq!(sw_score(b"WWWWAAWWWW", b"WWWWWWWW"), 76);
        // 4 W around a 1-residue gap: 44 - 11 = 33 beats ungapped WWWW/WWAW
        // (11 + 11 - 3 + 11 = 30) and WW alone (22).
        assert_eq!(sw_score(b"WWWW", b"WWAWW"), 33);
        // Durbin et al.'s example pair, checked against the reference.
        assert_eq!(
            sw_score(b"HEAGAWGHEE", b"PAWHEAE"),
            reference(b"HEAGAWGHEE", b"PAWHEAE")
        );
    }

    #[test]
    fn gotoh_matches_the_textbook_recurrence() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..300 {
            let lq = (next() % 40) as usize;
            let ls = (next() % 40) as usize;
            // Small alphabets make long matches, hence gaps, likely.
            let k = if round % 2 == 0 { 4 } else { 20 };
            let q: Vec<u8> = (0..lq).map(|_| ALPHABET[(next() % k) as usize]).collect();
            let s: Vec<u8> = (0..ls).map(|_| ALPHABET[(next() % k) as usize]).collect();
            assert_eq!(
                sw_score(&q, &s),
                reference(&q, &s),
                "{} / {}",
                String::from_utf8_lossy(&q),
                String::from_utf8_lossy(&s)
            );
            assert_eq!(sw_score(&q, &s), sw_score(&s, &q));
        }
    }
}
