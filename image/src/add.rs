//! Files from the host put into the image by path: `--add SRC:DEST`
//! (files, symlinks, directories, recursively) and the optional inputs of
//! [`BuildOptions`](crate::BuildOptions) (header, Python module).

use crate::cpio::{self, Node, Source, Tree};
use crate::error::io_err;
use crate::ImageError;
use std::fs;
use std::path::{Path, PathBuf};

/// Parses `SRC:DEST`. The split is at the last `:` (DEST must be absolute and
/// below `/`, without `.`/`..`); SRC must be non-empty. Existence of SRC is
/// checked by [`build`](crate::build()).
pub fn parse_add(spec: &str) -> Result<(PathBuf, String), ImageError> {
    let bad = |reason: &str| ImageError::InvalidAdd {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let (src, dest) = spec
        .rsplit_once(':')
        .ok_or_else(|| bad("no ':' separator"))?;
    if src.is_empty() {
        return Err(bad("SRC is empty"));
    }
    if dest.is_empty() {
        return Err(bad("DEST is empty"));
    }
    cpio::normalize(dest).map_err(|e| match e {
        ImageError::InvalidDest { reason, .. } => bad(&format!("DEST {reason}")),
        other => other,
    })?;
    Ok((PathBuf::from(src), dest.to_string()))
}

fn perm_of(meta: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

/// Adds `src` (file, symlink or directory, recursively) at `dest`.
pub(crate) fn add_path(tree: &mut Tree, src: &Path, dest: &str) -> Result<(), ImageError> {
    let meta = fs::symlink_metadata(src).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ImageError::MissingInput {
                what: "--add source",
                path: src.to_path_buf(),
            }
        } else {
            io_err("read", src)(e)
        }
    })?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(src).map_err(io_err("read", src))?;
        tree.insert(dest, Node::Symlink(target.to_string_lossy().into_owned()))
    } else if ft.is_dir() {
        use std::os::unix::fs::PermissionsExt;
        tree.insert(dest, Node::Dir(meta.permissions().mode() & 0o7777))?;
        let mut entries: Vec<_> = fs::read_dir(src)
            .map_err(io_err("list", src))?
            .collect::<Result<_, _>>()
            .map_err(io_err("list", src))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let name = name.to_str().ok_or_else(|| ImageError::InvalidDest {
                dest: format!("{dest}/{}", name.to_string_lossy()),
                reason: "file name is not UTF-8".into(),
            })?;
            add_path(
                tree,
                &e.path(),
                &format!("{}/{name}", dest.trim_end_matches('/')),
            )?;
        }
        Ok(())
    } else if ft.is_file() {
        tree.insert(
            dest,
            Node::File(perm_of(&meta), Source::Path(src.to_path_buf())),
        )
    } else {
        Err(ImageError::InvalidDest {
            dest: dest.to_string(),
            reason: format!("{} is not a file, directory or symlink", src.display()),
        })
    }
}

/// A required input file: must exist and be a regular file (symlinks followed).
pub(crate) fn input_file(what: &'static str, path: &Path) -> Result<fs::Metadata, ImageError> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(m),
        Ok(_) => Err(ImageError::MissingInput {
            what,
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ImageError::MissingInput {
            what,
            path: path.to_path_buf(),
        }),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_add_ok() {
        assert_eq!(
            parse_add("a/b:/opt/b").unwrap(),
            (PathBuf::from("a/b"), "/opt/b".to_string())
        );
        // the last ':' splits, so SRC may contain ':'
        assert_eq!(
            parse_add("x:y:/z").unwrap(),
            (PathBuf::from("x:y"), "/z".to_string())
        );
    }

    #[test]
    fn parse_add_errors() {
        for (spec, needle) in [
            ("nocolon", "no ':'"),
            (":/x", "SRC is empty"),
            ("a:", "DEST is empty"),
            ("a:rel/x", "absolute"),
            ("a:/", "below /"),
            ("a:/x/../y", "'..'"),
        ] {
            let e = parse_add(spec).unwrap_err();
            assert!(matches!(e, ImageError::InvalidAdd { .. }), "{spec}: {e:?}");
            let msg = e.to_string();
            assert!(msg.contains(needle), "{spec}: {msg}");
            assert!(msg.starts_with("Invalid --add"), "{msg}");
        }
    }
}
