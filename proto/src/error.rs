//! The one way snowflock prints an error: the error, then each of its
//! causes, separated by `": "`. Every binary and every error reply uses
//! [`chain`], so a cause is printed exactly once and never dropped.

use std::error::Error;

/// Renders an error with its sources, the way users see it.
pub fn chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        // A wrapper whose message already ends with its cause (a
        // `#[error("...: {0}")]` variant) must not print it twice.
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[derive(Debug, thiserror::Error)]
    #[error("Cannot clone")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("Wrapped: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn prints_every_cause_once() {
        let e = Outer(std::io::Error::other("disk full"));
        assert_eq!(chain(&e), "Cannot clone: disk full");
        let e = Repeats(std::io::Error::other("disk full"));
        assert_eq!(chain(&e), "Wrapped: disk full");
    }
}
