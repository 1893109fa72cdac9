//! A minimal writer for the cpio "newc" format (the one the Linux kernel unpacks
//! as an initramfs), plus [`Tree`], an in-memory file tree that is written in a
//! deterministic order.
//!
//! Layout of one entry: a 110-byte ASCII header (`070701` and 13 fields of
//! 8 hex digits), the NUL-terminated name padded to a multiple of 4 bytes
//! (counting from the header start), then the data padded to a multiple of 4.
//! The archive ends with an entry named `TRAILER!!!` and is zero-padded to a
//! multiple of 512 bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use crate::ImageError;

/// File type bits of `st_mode`.
pub const S_IFDIR: u32 = 0o040_000;
/// Regular file.
pub const S_IFREG: u32 = 0o100_000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120_000;
/// Character device.
pub const S_IFCHR: u32 = 0o020_000;

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// Streams cpio newc entries to `W`.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    offset: u64,
}

/// Fields of one newc header that vary between entries.
struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdev: (u32, u32),
}

impl<W: Write> CpioWriter<W> {
    /// A writer whose first entry gets inode number 1.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            offset: 0,
        }
    }

    fn header(&mut self, h: Header<'_>, ino: u32) -> io::Result<()> {
        let namesize = h.name.len() as u32 + 1;
        let mut s = String::with_capacity(110 + h.name.len() + 4);
        s.push_str(MAGIC);
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        for v in [
            ino, h.mode, 0, 0, h.nlink, 0, h.filesize, 0, 0, h.rdev.0, h.rdev.1, namesize, 0,
        ] {
            s.push_str(&format!("{v:08x}"));
        }
        s.push_str(h.name);
        s.push('\0');
        self.write_all(s.as_bytes())?;
        self.pad4()
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.offset += b.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, align: u64) -> io::Result<()> {
        let rem = self.offset % align;
        if rem != 0 {
            let zeros = vec![0u8; (align - rem) as usize];
            self.write_all(&zeros)?;
        }
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        self.pad_to(4)
    }

    fn ino(&mut self) -> u32 {
        let i = self.next_ino;
        self.next_ino += 1;
        i
    }

    /// A directory; `perm` holds only permission bits.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        let ino = self.ino();
        self.header(
            Header {
                name,
                mode: S_IFDIR | perm,
                nlink: 2,
                filesize: 0,
                rdev: (0, 0),
            },
            ino,
        )
    }

    /// A regular file whose `size` bytes are read from `data`.
    pub fn file(
        &mut self,
        name: &str,
        perm: u32,
        size: u64,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        let filesize = u32::try_from(size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "file too large for cpio newc (4 GiB)",
            )
        })?;
        let ino = self.ino();
        self.header(
            Header {
                name,
                mode: S_IFREG | perm,
                nlink: 1,
                filesize,
                rdev: (0, 0),
            },
            ino,
        )?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        self.offset += copied;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while it was being archived",
            ));
        }
        self.pad4()
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        let ino = self.ino();
        let h = Header {
            name,
            mode: S_IFLNK | 0o777,
            nlink: 1,
            filesize: target.len() as u32,
            rdev: (0, 0),
        };
        self.header(h, ino)?;
        self.write_all(target.as_bytes())?;
        self.pad4()
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let ino = self.ino();
        self.header(
            Header {
                name,
                mode: S_IFCHR | perm,
                nlink: 1,
                filesize: 0,
                rdev: (major, minor),
            },
            ino,
        )
    }

    /// Writes the trailer, pads the archive to 512 bytes and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(
            Header {
                name: TRAILER,
                mode: 0,
                nlink: 1,
                filesize: 0,
                rdev: (0, 0),
            },
            0,
        )?;
        self.pad_to(512)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Contents of a regular file in a [`Tree`].
#[derive(Debug, Clone)]
pub enum Source {
    /// Read from this host path when the archive is written.
    Path(PathBuf),
    /// These bytes.
    Bytes(Vec<u8>),
}

/// One node of a [`Tree`].
#[derive(Debug, Clone)]
pub enum Node {
    /// A directory with these permission bits.
    Dir(u32),
    /// A regular file with these permission bits.
    File(u32, Source),
    /// A symbolic link to this target.
    Symlink(String),
    /// A character device (permission bits, major, minor).
    CharDev(u32, u32, u32),
}

/// The file tree of an initramfs, keyed by normalised relative path
/// (`bin/busybox`). Parents are created on demand; iteration (and so the
/// archive) is in byte order of the path, which puts every directory before
/// its contents.
#[derive(Debug, Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

/// Normalises an absolute in-image path (`/usr//lib/` -> `usr/lib`).
/// Rejects relative paths, `.`/`..` components, NUL bytes and the root itself.
pub fn normalize(dest: &str) -> Result<String, ImageError> {
    let bad = |reason: &str| ImageError::InvalidDest {
        dest: dest.to_string(),
        reason: reason.to_string(),
    };
    if !dest.starts_with('/') {
        return Err(bad("must be an absolute path"));
    }
    if dest.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    let mut parts = Vec::new();
    for c in dest.split('/') {
        match c {
            "" => {}
            "." | ".." => return Err(bad("must not contain '.' or '..' components")),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(bad("must name something below /"));
    }
    Ok(parts.join("/"))
}

impl Tree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    fn ensure_parents(&mut self, path: &str) -> Result<(), ImageError> {
        let mut idx = 0;
        while let Some(pos) = path[idx..].find('/') {
            let parent = &path[..idx + pos];
            match self.nodes.get(parent) {
                None => {
                    self.nodes.insert(parent.to_string(), Node::Dir(0o755));
                }
                Some(Node::Dir(_)) => {}
                Some(_) => {
                    return Err(ImageError::PathConflict {
                        path: format!("/{path}"),
                        reason: format!("/{parent} is not a directory"),
                    })
                }
            }
            idx += pos + 1;
        }
        Ok(())
    }

    /// Inserts `node` at absolute path `dest`, creating parents. A later file or
    /// symlink replaces an earlier one; a directory and a non-directory at the
    /// same path conflict.
    pub fn insert(&mut self, dest: &str, node: Node) -> Result<(), ImageError> {
        let path = normalize(dest)?;
        self.ensure_parents(&path)?;
        match (self.nodes.get(&path), &node) {
            (Some(Node::Dir(_)), Node::Dir(_)) | (None, _) => {}
            (Some(Node::Dir(_)), _) => {
                return Err(ImageError::PathConflict {
                    path: format!("/{path}"),
                    reason: "a directory is already there".into(),
                })
            }
            (Some(_), Node::Dir(_)) => {
                return Err(ImageError::PathConflict {
                    path: format!("/{path}"),
                    reason: "a file is already there".into(),
                })
            }
            (Some(_), _) => {}
        }
        self.nodes.insert(path, node);
        Ok(())
    }

    /// Whether `dest` (absolute) is in the tree.
    pub fn contains(&self, dest: &str) -> bool {
        normalize(dest)
            .map(|p| self.nodes.contains_key(&p))
            .unwrap_or(false)
    }

    /// The node at absolute path `dest`.
    pub fn get(&self, dest: &str) -> Option<&Node> {
        normalize(dest).ok().and_then(|p| self.nodes.get(&p))
    }

    /// All paths, absolute, in archive order.
    pub fn paths(&self) -> Vec<String> {
        self.nodes.keys().map(|k| format!("/{k}")).collect()
    }

    /// Writes the tree as a complete newc archive.
    pub fn write<W: Write>(&self, out: W) -> Result<W, ImageError> {
        let io_err = |path: &str, source: io::Error| ImageError::Io {
            action: "archive",
            path: PathBuf::from(format!("/{path}")),
            source,
        };
        let mut w = CpioWriter::new(out);
        for (path, node) in &self.nodes {
            match node {
                Node::Dir(perm) => w.dir(path, *perm).map_err(|e| io_err(path, e))?,
                Node::Symlink(target) => w.symlink(path, target).map_err(|e| io_err(path, e))?,
                Node::CharDev(perm, major, minor) => w
                    .char_dev(path, *perm, *major, *minor)
                    .map_err(|e| io_err(path, e))?,
                Node::File(perm, Source::Bytes(b)) => w
                    .file(path, *perm, b.len() as u64, &mut &b[..])
                    .map_err(|e| io_err(path, e))?,
                Node::File(perm, Source::Path(src)) => {
                    let read_err = |source| ImageError::Io {
                        action: "read",
                        path: src.clone(),
                        source,
                    };
                    let mut f = File::open(src).map_err(read_err)?;
                    let size = f.metadata().map_err(read_err)?.len();
                    w.file(path, *perm, size, &mut f)
                        .map_err(|e| io_err(path, e))?;
                }
            }
        }
        w.finish().map_err(|e| ImageError::Io {
            action: "write",
            path: PathBuf::from("initramfs"),
            source: e,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(h: &[u8], i: usize) -> u32 {
        let s = std::str::from_utf8(&h[6 + 8 * i..6 + 8 * (i + 1)]).unwrap();
        u32::from_str_radix(s, 16).unwrap()
    }

    #[test]
    fn header_fields_and_padding() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("ab", 0o755, 5, &mut &b"hello"[..]).unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(&buf[..6], b"070701");
        assert_eq!(field(&buf, 0), 1, "ino");
        assert_eq!(field(&buf, 1), S_IFREG | 0o755, "mode");
        assert_eq!(field(&buf, 2), 0, "uid");
        assert_eq!(field(&buf, 4), 1, "nlink");
        assert_eq!(field(&buf, 5), 0, "mtime");
        assert_eq!(field(&buf, 6), 5, "filesize");
        assert_eq!(field(&buf, 11), 3, "namesize includes NUL");
        assert_eq!(field(&buf, 12), 0, "check");
        // 110 header + "ab\0" = 113 -> padded to 116, then data.
        assert_eq!(&buf[110..113], b"ab\0");
        assert_eq!(&buf[113..116], &[0, 0, 0]);
        assert_eq!(&buf[116..121], b"hello");
        // data padded to 124; the trailer starts there.
        assert_eq!(&buf[121..124], &[0, 0, 0]);
        let t = &buf[124..];
        assert_eq!(&t[..6], b"070701");
        assert_eq!(field(t, 11), 11);
        assert_eq!(&t[110..121], b"TRAILER!!!\0");
        assert_eq!(buf.len() % 512, 0);
        assert!(buf[124 + 121..].iter().all(|&b| b == 0));
    }

    #[test]
    fn name_exactly_aligned_gets_no_padding() {
        // 110 + namesize 2 ("a\0") = 112, already aligned.
        let mut w = CpioWriter::new(Vec::new());
        w.dir("a", 0o755).unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(field(&buf, 1), S_IFDIR | 0o755);
        assert_eq!(field(&buf, 4), 2);
        assert_eq!(&buf[110..112], b"a\0");
        assert_eq!(&buf[112..118], b"070701");
    }

    #[test]
    fn symlink_and_device() {
        let mut w = CpioWriter::new(Vec::new());
        w.symlink("sh", "/bin/busybox").unwrap();
        w.char_dev("console", 0o600, 5, 1).unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(field(&buf, 1), S_IFLNK | 0o777);
        assert_eq!(field(&buf, 6), 12);
        assert_eq!(&buf[110..113], b"sh\0");
        assert_eq!(&buf[116..128], b"/bin/busybox");
        let d = &buf[128..];
        assert_eq!(field(d, 0), 2, "inodes count up");
        assert_eq!(field(d, 1), S_IFCHR | 0o600);
        assert_eq!((field(d, 9), field(d, 10)), (5, 1));
    }

    #[test]
    fn short_reader_is_an_error() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("x", 0o644, 10, &mut &b"abc"[..]).is_err());
    }

    #[test]
    fn tree_orders_and_creates_parents() {
        let mut t = Tree::new();
        t.insert(
            "/usr/bin/x",
            Node::File(0o755, Source::Bytes(b"x".to_vec())),
        )
        .unwrap();
        t.insert("/bin/sh", Node::Symlink("/bin/busybox".into()))
            .unwrap();
        t.insert("/a-b", Node::Dir(0o700)).unwrap();
        assert_eq!(
            t.paths(),
            vec!["/a-b", "/bin", "/bin/sh", "/usr", "/usr/bin", "/usr/bin/x"]
        );
        // a file under a file conflicts; a dir over a file conflicts
        assert!(matches!(
            t.insert("/bin/sh/x", Node::Dir(0o755)),
            Err(ImageError::PathConflict { .. })
        ));
        assert!(matches!(
            t.insert("/usr/bin/x", Node::Dir(0o755)),
            Err(ImageError::PathConflict { .. })
        ));
        assert!(matches!(
            t.insert("/usr", Node::Symlink("x".into())),
            Err(ImageError::PathConflict { .. })
        ));
        // a later file replaces an earlier one
        t.insert("/usr/bin/x", Node::Symlink("y".into())).unwrap();
        assert!(matches!(t.get("/usr/bin/x"), Some(Node::Symlink(s)) if s == "y"));
        let buf = t.write(Vec::new()).unwrap();
        // The archive's names appear in tree order.
        let text = String::from_utf8_lossy(&buf);
        let pos = |n: &str| text.find(&format!("{n}\0")).unwrap();
        assert!(pos("a-b") < pos("bin") && pos("bin/sh") < pos("usr/bin/x"));
    }

    #[test]
    fn normalize_paths() {
        assert_eq!(normalize("/usr//lib/").unwrap(), "usr/lib");
        assert!(normalize("usr").is_err());
        assert!(normalize("/").is_err());
        assert!(normalize("/a/../b").is_err());
        assert!(normalize("/a/./b").is_err());
    }
}
