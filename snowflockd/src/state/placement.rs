//! Where a ticket's clones go: spread over the cluster's hosts by free
//! capacity.

/// Spreads `n` clones over hosts by free capacity: each clone goes to the
/// host with the most free slots left; ties go to other hosts than the
/// origin (its CPU runs the parent), then by name. Returns (host, count)
/// with the origin first, hosts without clones left out (but the origin).
pub fn place(origin: &str, free: &[(String, u32)], n: u32) -> Vec<(String, u32)> {
    let mut left: Vec<(String, u32, u32)> = free.iter().map(|(h, f)| (h.clone(), *f, 0)).collect();
    for _ in 0..n {
        let best = left.iter_mut().filter(|(_, f, _)| *f > 0).max_by(|a, b| {
            a.1.cmp(&b.1)
                .then_with(|| (b.0 == origin).cmp(&(a.0 == origin)))
                .then_with(|| b.0.cmp(&a.0))
        });
        match best {
            Some(b) => {
                b.1 -= 1;
                b.2 += 1;
            }
            None => break,
        }
    }
    let mut out: Vec<(String, u32)> = Vec::new();
    out.push((
        origin.to_string(),
        left.iter()
            .find(|l| l.0 == origin)
            .map(|l| l.2)
            .unwrap_or(0),
    ));
    out.extend(
        left.into_iter()
            .filter(|l| l.0 != origin && l.2 > 0)
            .map(|l| (l.0, l.2)),
    );
    out
}

/// Host of each clone ID 1..=granted, in order, from a placement; clones
/// the placement leaves out stay on `me`.
pub fn hosts_by_clone(placement: &[(String, u32)], granted: u32, me: &str) -> Vec<String> {
    let mut v: Vec<String> = placement
        .iter()
        .flat_map(|(h, n)| std::iter::repeat_n(h.clone(), *n as usize))
        .collect();
    v.resize(granted as usize, me.to_string());
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn f(v: &[(&str, u32)]) -> Vec<(String, u32)> {
        v.iter().map(|(h, n)| (h.to_string(), *n)).collect()
    }

    #[test]
    fn spreads_by_free_capacity_preferring_other_hosts() {
        assert_eq!(
            place("h0", &f(&[("h0", 7), ("h1", 8), ("h2", 8)]), 2),
            f(&[("h0", 0), ("h1", 1), ("h2", 1)])
        );
        assert_eq!(
            place("h0", &f(&[("h0", 8), ("h1", 8), ("h2", 8)]), 3),
            f(&[("h0", 1), ("h1", 1), ("h2", 1)])
        );
        assert_eq!(
            place("h0", &f(&[("h0", 2), ("h1", 9)]), 4),
            f(&[("h0", 0), ("h1", 4)])
        );
        assert_eq!(place("h0", &f(&[("h0", 3)]), 2), f(&[("h0", 2)]));
        // Never more than a host has.
        assert_eq!(
            place("h0", &f(&[("h0", 1), ("h1", 1)]), 5),
            f(&[("h0", 1), ("h1", 1)])
        );
    }

    #[test]
    fn clone_ids_follow_the_placement_in_order() {
        let p = f(&[("h0", 1), ("h1", 2)]);
        assert_eq!(hosts_by_clone(&p, 3, "h0"), vec!["h0", "h1", "h1"]);
        assert_eq!(hosts_by_clone(&f(&[("h0", 0)]), 2, "h0"), vec!["h0", "h0"]);
    }

    fn cluster() -> impl Strategy<Value = Vec<(String, u32)>> {
        proptest::collection::vec(0u32..20, 1..6).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, f)| (format!("h{i}"), f))
                .collect()
        })
    }

    proptest! {
        /// Placement gives min(n, total free) clones, never more than a host
        /// has, names the origin first, and never a host without clones
        /// (but the origin).
        #[test]
        fn placement_respects_capacity(free in cluster(), n in 0u32..100) {
            let out = place("h0", &free, n);
            let total: u32 = free.iter().map(|(_, f)| f).sum();
            prop_assert_eq!(out.iter().map(|(_, c)| c).sum::<u32>(), n.min(total));
            prop_assert_eq!(&out[0].0, "h0");
            for (h, c) in &out {
                let cap = free.iter().find(|(x, _)| x == h).map(|(_, f)| *f).unwrap_or(0);
                prop_assert!(*c <= cap);
                if h != "h0" { prop_assert!(*c > 0); }
            }
            // Balanced: after placing, no host that got a clone has fewer
            // free slots left than another host with room by more than one.
            let left = |h: &str| {
                let cap = free.iter().find(|(x, _)| x == h).map(|(_, f)| *f).unwrap_or(0);
                cap - out.iter().find(|(x, _)| x == h).map(|(_, c)| *c).unwrap_or(0)
            };
            for (h, c) in &out {
                if *c == 0 { continue; }
                for (g, _) in &free {
                    prop_assert!(left(h) + 1 >= left(g), "{} left {} but {} left {}", h, left(h), g, left(g));
                }
            }
        }
    }
}
