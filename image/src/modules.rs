//! Picks the kernel modules the guest needs and their dependencies.
//!
//! Dependencies come from `modules.dep` when the kernel tree has one (it does
//! after `depmod`); Debian's package ships none, so otherwise they are read
//! from the `depends=` entry of each module's `.modinfo` ELF section.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ImageError;

/// The modules the guest loads at boot (virtio-mmio transport, the agent's
/// serial port, networking, entropy, balloon/free page reporting).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_console",
    "virtio_net",
    "virtio_rng",
    "virtio_balloon",
];

/// A module to put into the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Canonical name (`virtio_rng`).
    pub name: String,
    /// File name inside `/lib/modules` (`virtio-rng.ko`, always uncompressed).
    pub file_name: String,
    /// Uncompressed contents.
    pub data: Vec<u8>,
}

/// Canonical module name: file name without `.ko[.xz|.gz|.zst]`, `-` as `_`.
pub fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            walk(&p, out)?;
        } else if p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(".ko"))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads a module file, decompressing `.ko.xz` / `.ko.gz` / `.ko.zst` with the
/// matching command-line tool.
fn read_module(path: &Path) -> Result<Vec<u8>, ImageError> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.gz") {
        Some("gzip")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else {
        None
    };
    match tool {
        None => fs::read(path).map_err(|source| ImageError::Io {
            action: "read",
            path: path.into(),
            source,
        }),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .map_err(|e| ImageError::Decompress {
                    path: path.into(),
                    reason: format!("cannot run {tool}: {e}"),
                })?;
            if !out.status.success() {
                return Err(ImageError::Decompress {
                    path: path.into(),
                    reason: format!(
                        "{tool} -dc failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
            Ok(out.stdout)
        }
    }
}

/// The NUL-separated `key=value` strings of an ELF64 LE object's `.modinfo`
/// section, or `None` when the bytes are not such an object.
pub fn modinfo(elf: &[u8]) -> Option<Vec<String>> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let shstrndx = u16_at(0x3e)? as usize;
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let base = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(base)?;
        let off = usize::try_from(u64_at(base + 0x18)?).ok()?;
        let size = usize::try_from(u64_at(base + 0x20)?).ok()?;
        Some((name, off, size))
    };
    let (_, stroff, strsize) = section(shstrndx)?;
    let strtab = elf.get(stroff..stroff.checked_add(strsize)?)?;
    for i in 0..shnum {
        let (name, off, size) = section(i)?;
        let n = strtab.get(name as usize..)?;
        let n = &n[..n.iter().position(|&b| b == 0)?];
        if n == b".modinfo" {
            let data = elf.get(off..off.checked_add(size)?)?;
            return Some(
                data.split(|&b| b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect(),
            );
        }
    }
    Some(Vec::new())
}

/// Resolves `wanted` (plus dependencies) in the module tree `modules_dir`
/// (`/lib/modules/<kver>`). Returns the modules in load order, dependencies
/// first; built-in modules are left out.
pub fn resolve(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<Module>, ImageError> {
    if !modules_dir.is_dir() {
        return Err(ImageError::MissingModules {
            path: modules_dir.to_path_buf(),
        });
    }
    let builtin: HashSet<String> = fs::read_to_string(modules_dir.join("modules.builtin"))
        .map(|s| s.lines().map(module_name).collect())
        .unwrap_or_default();

    // name -> relative path of every module file
    let mut files = Vec::new();
    walk(&modules_dir.join("kernel"), &mut files).map_err(|source| ImageError::Io {
        action: "list",
        path: modules_dir.join("kernel"),
        source,
    })?;
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    for f in files {
        let name = module_name(&f.to_string_lossy());
        by_name.entry(name).or_insert(f);
    }

    // modules.dep, when present: "kernel/a.ko: kernel/b.ko kernel/c.ko"
    let dep_file: Option<BTreeMap<String, Vec<String>>> =
        fs::read_to_string(modules_dir.join("modules.dep"))
            .ok()
            .map(|s| {
                s.lines()
                    .filter_map(|l| l.split_once(':'))
                    .map(|(m, deps)| {
                        (
                            module_name(m),
                            deps.split_whitespace().map(module_name).collect(),
                        )
                    })
                    .collect()
            });

    struct St<'a> {
        builtin: &'a HashSet<String>,
        by_name: &'a BTreeMap<String, PathBuf>,
        dep_file: &'a Option<BTreeMap<String, Vec<String>>>,
        modules_dir: &'a Path,
        done: HashSet<String>,
        visiting: Vec<String>,
        out: Vec<Module>,
    }
    fn visit(st: &mut St<'_>, name: &str, wanted_by: Option<&str>) -> Result<(), ImageError> {
        let name = module_name(name);
        if st.done.contains(&name) || st.builtin.contains(&name) {
            return Ok(());
        }
        if st.visiting.contains(&name) {
            return Err(ImageError::ModuleCycle { name });
        }
        let Some(path) = st.by_name.get(&name) else {
            return Err(ImageError::MissingModule {
                name,
                wanted_by: wanted_by.map(str::to_string),
                dir: st.modules_dir.to_path_buf(),
            });
        };
        let data = read_module(path)?;
        let deps: Vec<String> = match st.dep_file.as_ref().and_then(|d| d.get(&name)) {
            Some(d) => d.clone(),
            None => {
                let info = modinfo(&data).ok_or_else(|| ImageError::BadModule {
                    path: path.clone(),
                    reason: "not an ELF64 object".into(),
                })?;
                info.iter()
                    .filter_map(|kv| kv.strip_prefix("depends="))
                    .flat_map(|d| d.split(','))
                    .filter(|d| !d.is_empty())
                    .map(str::to_string)
                    .collect()
            }
        };
        st.visiting.push(name.clone());
        for d in &deps {
            visit(st, d, Some(&name))?;
        }
        st.visiting.pop();
        let base = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("module.ko");
        let file_name = format!("{}.ko", base.split(".ko").next().unwrap_or(base));
        st.done.insert(name.clone());
        st.out.push(Module {
            name,
            file_name,
            data,
        });
        Ok(())
    }

    let mut st = St {
        builtin: &builtin,
        by_name: &by_name,
        dep_file: &dep_file,
        modules_dir,
        done: HashSet::new(),
        visiting: Vec::new(),
        out: Vec::new(),
    };
    for w in wanted {
        visit(&mut st, w, None)?;
    }
    Ok(st.out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko"),
            "virtio_rng"
        );
        assert_eq!(module_name("virtio_ring.ko.xz"), "virtio_ring");
        assert_eq!(module_name("rng-core"), "rng_core");
    }

    #[test]
    fn modinfo_rejects_garbage() {
        assert_eq!(modinfo(b"not an elf"), None);
        assert_eq!(modinfo(b"\x7fELF\x02\x01\x01"), None);
    }

    #[test]
    fn resolve_with_modules_dep() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("kernel/drivers");
        fs::create_dir_all(&k).unwrap();
        for m in ["a.ko", "b-x.ko", "c.ko", "d.ko"] {
            fs::write(k.join(m), m).unwrap();
        }
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/drivers/a.ko: kernel/drivers/b-x.ko kernel/drivers/c.ko\nkernel/drivers/b-x.ko: kernel/drivers/c.ko\nkernel/drivers/c.ko:\n",
        )
        .unwrap();
        fs::write(dir.path().join("modules.builtin"), "kernel/drivers/d.ko\n").unwrap();
        let mods = resolve(dir.path(), &["a", "d"]).unwrap();
        let names: Vec<_> = mods.iter().map(|m| m.file_name.as_str()).collect();
        assert_eq!(names, ["c.ko", "b-x.ko", "a.ko"]);
        assert_eq!(mods[2].data, b"a.ko");
        match resolve(dir.path(), &["zz"]) {
            Err(e @ ImageError::MissingModule { .. }) => assert!(e.to_string().contains("zz")),
            other => panic!("{other:?}"),
        }
    }
}
