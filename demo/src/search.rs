//! Scoring a share of the database, and merging hits.

use crate::data::Protein;
use crate::sw::Profile;
use serde::{Deserialize, Serialize};

/// One scored database sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hit {
    pub id: u32,
    pub name: String,
    pub score: i32,
}

/// Whether sequence `id` belongs to share `(index, total)`: `id % total ==
/// index`. Every id belongs to exactly one of the shares `0..total`.
pub fn in_share(id: u32, (index, total): (usize, usize)) -> bool {
    assert!(total > 0 && index < total, "bad share ({index}, {total})");
    id as usize % total == index
}

/// Scores every sequence of `db` in share `(index, total)` against `query`,
/// in database order.
///
/// # Panics
/// If `total == 0` or `index >= total`.
pub fn search(db: &[Protein], query: &[u8], share: (usize, usize)) -> Vec<Hit> {
    let profile = Profile::new(query);
    db.iter()
        .filter(|p| in_share(p.id, share))
        .map(|p| Hit {
            id: p.id,
            name: p.name.clone(),
            score: profile.score(&p.seq),
        })
        .collect()
}

/// Dynamic-programming cells a search of `share` computes: query length
/// times the residues of the share.
pub fn share_cells(db: &[Protein], query_len: usize, share: (usize, usize)) -> u64 {
    db.iter()
        .filter(|p| in_share(p.id, share))
        .map(|p| p.seq.len() as u64)
        .sum::<u64>()
        * query_len as u64
}

/// The `k` best hits: score descending, then id ascending. The result does
/// not depend on the order of `hits`; the same id given twice is kept once
/// (its best entry).
pub fn merge_top(hits: impl IntoIterator<Item = Hit>, k: usize) -> Vec<Hit> {
    let mut all: Vec<Hit> = hits.into_iter().collect();
    all.sort_by(|a, b| {
        b.score
            .cmp(&a.score)
            .then(a.id.cmp(&b.id))
            .then(a.name.cmp(&b.name))
    });
    all.dedup_by_key(|h| h.id);
    all.truncate(k);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{generate_db, generate_query};

    fn h(id: u32, score: i32) -> Hit {
        Hit {
            id,
            name: format!("SFP{id:05}"),
            score,
        }
    }

    #[test]
    fn shares_cover_every_sequence_exactly_once() {
        let q = generate_query(5, 30);
        let db = generate_db(5, 97, 20, 40, &q);
        let whole = search(&db, &q, (0, 1));
        assert_eq!(whole.len(), 97);
        for total in [1, 2, 3, 7, 16, 97, 200] {
            let mut seen = vec![0u32; db.len()];
            let mut parts = Vec::new();
            let mut cells = 0;
            for index in 0..total {
                let part = search(&db, &q, (index, total));
                assert!(part.iter().all(|h| h.id as usize % total == index));
                for hit in &part {
                    seen[hit.id as usize] += 1;
                }
                cells += share_cells(&db, q.len(), (index, total));
                parts.extend(part);
            }
            assert!(seen.iter().all(|&n| n == 1), "total {total}: {seen:?}");
            assert_eq!(cells, share_cells(&db, q.len(), (0, 1)));
            // The union of the shares scores like the whole search.
            parts.sort_by_key(|h| h.id);
            assert_eq!(parts, whole);
        }
    }

    #[test]
    #[should_panic(expected = "bad share")]
    fn bad_share_panics() {
        in_share(3, (2, 2));
    }

    #[test]
    fn merge_orders_by_score_then_id() {
        let hits = vec![h(5, 10), h(2, 30), h(9, 30), h(1, 10), h(7, 20)];
        let ids = |v: &[Hit]| v.iter().map(|h| h.id).collect::<Vec<_>>();
        assert_eq!(ids(&merge_top(hits.clone(), 10)), vec![2, 9, 7, 1, 5]);
        assert_eq!(ids(&merge_top(hits.clone(), 3)), vec![2, 9, 7]);
        assert!(merge_top(hits.clone(), 0).is_empty());
        // Any order of the input, any split into pieces: the same answer.
        let mut rev = hits.clone();
        rev.reverse();
        assert_eq!(merge_top(rev, 3), merge_top(hits.clone(), 3));
        let pieces = [
            merge_top(hits[..2].to_vec(), 3),
            merge_top(hits[2..].to_vec(), 3),
        ];
        assert_eq!(merge_top(pieces.concat(), 3), merge_top(hits.clone(), 3));
        // Duplicates collapse.
        assert_eq!(
            ids(&merge_top(vec![h(4, 1), h(4, 1), h(3, 1)], 5)),
            vec![3, 4]
        );
    }

    #[test]
    fn top_k_of_shares_merges_to_the_global_top_k() {
        let q = generate_query(11, 60);
        let db = generate_db(11, 200, 40, 120, &q);
        let global = merge_top(search(&db, &q, (0, 1)), 10);
        for total in [2, 3, 5] {
            let merged = merge_top(
                (0..total).flat_map(|i| merge_top(search(&db, &q, (i, total)), 10)),
                10,
            );
            assert_eq!(merged, global, "total {total}");
        }
    }
}
