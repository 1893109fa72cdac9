//! Which Debian archive the image is built from: the host's own apt
//! configuration (`/etc/apt/sources.list` and `sources.list.d/*.list` in
//! one-line form, `sources.list.d/*.sources` in deb822 form), never a name
//! written into the code. The first enabled `deb` entry of the wanted suite
//! with the `main` component wins.

use crate::ImageError;
use std::path::Path;

/// A Debian archive and suite to debootstrap from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    /// The archive's URI, as the host's apt configuration gives it.
    pub uri: String,
    /// The suite (`bookworm`).
    pub suite: String,
}

/// The suite to build: the host's own release codename
/// (`VERSION_CODENAME` in `os-release`), so that the guest's glibc is the
/// one the guest binaries were linked against.
pub fn host_codename(os_release: &str) -> Option<String> {
    os_release.lines().find_map(|l| {
        l.strip_prefix("VERSION_CODENAME=")
            .map(|v| v.trim().trim_matches('"').to_string())
            .filter(|v| !v.is_empty())
    })
}

/// One `deb` entry: its URIs, suites and components.
#[derive(Debug, Default)]
struct Entry {
    types: Vec<String>,
    uris: Vec<String>,
    suites: Vec<String>,
    components: Vec<String>,
    enabled: bool,
}

impl Entry {
    fn serves(&self, suite: &str) -> Option<&str> {
        let ok = self.enabled
            && self.types.iter().any(|t| t == "deb")
            && self.suites.iter().any(|s| s == suite)
            && self.components.iter().any(|c| c == "main");
        ok.then(|| self.uris.first().map(String::as_str))
            .flatten()
            .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
    }
}

/// Entries of a one-line `sources.list` file.
fn parse_one_line(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let Some(kind) = words.next() else { continue };
        let mut rest: Vec<&str> = words.collect();
        // Options: `[arch=amd64 signed-by=...]`, possibly over several words.
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let end = rest.iter().position(|w| w.ends_with(']')).unwrap_or(0);
            rest.drain(..=end);
        }
        if rest.len() < 2 {
            continue;
        }
        out.push(Entry {
            types: vec![kind.to_string()],
            uris: vec![rest[0].to_string()],
            suites: vec![rest[1].to_string()],
            components: rest[2..].iter().map(|s| s.to_string()).collect(),
            enabled: true,
        });
    }
    out
}

/// Entries of a deb822 `.sources` file (paragraphs of `Field: value`).
fn parse_deb822(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut cur = Entry {
        enabled: true,
        ..Entry::default()
    };
    let mut seen = false;
    let mut flush = |cur: &mut Entry, seen: &mut bool| {
        if *seen {
            out.push(std::mem::replace(
                cur,
                Entry {
                    enabled: true,
                    ..Entry::default()
                },
            ));
        }
        *seen = false;
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            flush(&mut cur, &mut seen);
            continue;
        }
        if line.starts_with('#') || line.starts_with(char::is_whitespace) {
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let words = || v.split_whitespace().map(str::to_string).collect();
        seen = true;
        match k.trim().to_ascii_lowercase().as_str() {
            "types" => cur.types = words(),
            "uris" => cur.uris = words(),
            "suites" => cur.suites = words(),
            "components" => cur.components = words(),
            "enabled" => cur.enabled = v.trim() != "no",
            _ => {}
        }
    }
    flush(&mut cur, &mut seen);
    out
}

/// The archive for `suite` in the apt configuration under `etc_apt`
/// (`/etc/apt`).
pub fn find_source(etc_apt: &Path, suite: &str) -> Result<AptSource, ImageError> {
    let mut files = vec![etc_apt.join("sources.list")];
    if let Ok(rd) = std::fs::read_dir(etc_apt.join("sources.list.d")) {
        let mut more: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let entries = match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => parse_deb822(&text),
            Some("list") => parse_one_line(&text),
            _ => continue,
        };
        if let Some(uri) = entries.iter().find_map(|e| e.serves(suite)) {
            return Ok(AptSource {
                uri: uri.to_string(),
                suite: suite.to_string(),
            });
        }
    }
    Err(ImageError::NoAptSource {
        suite: suite.to_string(),
        dir: etc_apt.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_entry_of_the_suite_with_main() {
        let text = "\
Types: deb
# a comment
URIs: http://archive.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main
";
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sources.list.d")).unwrap();
        std::fs::write(d.path().join("sources.list.d/debian.sources"), text).unwrap();
        let s = find_source(d.path(), "bookworm").unwrap();
        assert_eq!(s.uri, "http://archive.example/debian");
        assert_eq!(s.suite, "bookworm");
        let e = find_source(d.path(), "trixie").unwrap_err();
        assert!(e.to_string().contains("trixie"), "{e}");
    }

    #[test]
    fn one_line_entries_with_options_and_disabled_paragraphs() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("sources.list"),
            "# deb http://old.example/debian bookworm main\n\
             deb-src http://src.example/debian bookworm main\n\
             deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main contrib\n",
        )
        .unwrap();
        assert_eq!(
            find_source(d.path(), "bookworm").unwrap().uri,
            "http://one.example/debian"
        );
        let entries = parse_deb822(
            "Types: deb\nURIs: http://off.example/\nSuites: bookworm\nComponents: main\nEnabled: no\n",
        );
        assert!(entries[0].serves("bookworm").is_none());
        // A file: URI or a suite without main is not a debootstrap source.
        let entries =
            parse_one_line("deb file:/srv/repo bookworm main\ndeb http://x/ bookworm contrib\n");
        assert!(entries.iter().all(|e| e.serves("bookworm").is_none()));
    }

    #[test]
    fn codename_from_os_release() {
        let text = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_CODENAME=bookworm\nID=debian\n";
        assert_eq!(host_codename(text).as_deref(), Some("bookworm"));
        assert_eq!(host_codename("ID=debian\n"), None);
    }
}
