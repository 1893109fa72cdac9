//! The guest package, `snowflock-guest_<version>_amd64.deb`: the agent
//! installed the way an admin would (`dpkg -i`), for guests booted by
//! systemd (the Debian image, or a user's own VM; `docs/guest-install.md`).
//!
//! | path | from |
//! |---|---|
//! | `/usr/sbin/snowflock-agent`, `/usr/bin/{sf,sf-exec,sfmpirun}` | the static guest binaries ([`DebOptions::guest_bin_dir`]), without debug information |
//! | `/usr/lib/x86_64-linux-gnu/libsnowflock.so` | [`DebOptions::lib_dir`], when it has one (it needs glibc: `Depends: libc6`) |
//! | `/usr/lib/x86_64-linux-gnu/snowflock/libsnowflock_mpi_shim.so` | [`DebOptions::lib_dir`], when it has one: what `sfmpirun` preloads into MPICH jobs (`mpi-shim/`) |
//! | `/usr/include/snowflock.h`, `/usr/lib/python3/dist-packages/snowflock.py` | the given files, or the copies built into this crate |
//! | `/lib/systemd/system/snowflock-agent.service` | [`deb_files::UNIT`] |
//! | `/etc/snowflock/agent.toml` (conffile) | [`deb_files::agent_toml`] |
//! | `/usr/lib/modules-load.d/snowflock.conf` | [`deb_files::MODULES_LOAD`] |
//! | `/usr/share/doc/snowflock-guest/{copyright,README.Debian}` | [`deb_files`] |
//! | `DEBIAN/{control,conffiles,postinst,prerm,postrm,triggers}` | here and [`deb_files`] |
//!
//! The tree is staged in a temporary directory and packed by
//! `dpkg-deb --root-owner-group -Zxz --build` (every file owned by root),
//! into a temporary name in the output directory renamed at the end.

use crate::add::input_file;
use crate::cpio::Source;
use crate::deb_files;
use crate::error::io_err;
use crate::guest_bins::{stripped, AGENT_BIN};
use crate::ImageError;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `SOURCE_DATE_EPOCH` of every package build (2026-01-01).
const REPRODUCIBLE_EPOCH: &str = "1767225600";
/// The package name.
pub const DEB_PACKAGE: &str = "snowflock-guest";
/// The package version by default: the workspace's.
pub const DEB_VERSION: &str = env!("CARGO_PKG_VERSION");
/// `libsnowflock.so` is built against glibc 2.34 or later symbols.
const LIBC_DEPENDS: &str = "libc6 (>= 2.34)";
const SF_BIN: &str = "sf";
/// `sf-exec` and `sfmpirun`, MPI on clones (docs/mpi.md).
const MPI_BINS: [&str; 2] = ["sf-exec", "sfmpirun"];
const LIB: &str = "libsnowflock.so";
/// The shim `sfmpirun` preloads into MPICH jobs (`mpi-shim/`).
const MPI_SHIM: &str = "libsnowflock_mpi_shim.so";
/// Where the package puts it; `sfmpirun` looks there.
pub const MPI_SHIM_PATH: &str = "/usr/lib/x86_64-linux-gnu/snowflock/libsnowflock_mpi_shim.so";
const HEADER: &str = include_str!("../../guest-agent/include/snowflock.h");
const PYTHON_MODULE: &str = include_str!("../../guest-agent/python/snowflock.py");

/// What to build the guest package from.
#[derive(Debug, Clone)]
pub struct DebOptions {
    /// Where the `.deb` is written (created if missing).
    pub out_dir: PathBuf,
    /// Static guest binaries: `snowflock-agent` and `sf` (both required).
    pub guest_bin_dir: PathBuf,
    /// Directory with `libsnowflock.so`; `None`, or no library there: the
    /// package has no library (logged).
    pub lib_dir: Option<PathBuf>,
    /// `snowflock.h`; `None`: the copy built into this crate.
    pub header: Option<PathBuf>,
    /// `snowflock.py`; `None`: the copy built into this crate.
    pub python_module: Option<PathBuf>,
    /// Package version (default [`DEB_VERSION`]).
    pub version: String,
    /// The `dpkg-deb` program (default `dpkg-deb`, looked up in `PATH`).
    pub dpkg_deb: PathBuf,
}

impl DebOptions {
    /// Options with the defaults: no library, the built-in header and
    /// Python module, version [`DEB_VERSION`].
    pub fn new(out_dir: impl Into<PathBuf>, guest_bin_dir: impl Into<PathBuf>) -> Self {
        DebOptions {
            out_dir: out_dir.into(),
            guest_bin_dir: guest_bin_dir.into(),
            lib_dir: None,
            header: None,
            python_module: None,
            version: DEB_VERSION.to_string(),
            dpkg_deb: PathBuf::from("dpkg-deb"),
        }
    }
}

/// `snowflock-guest_<version>_amd64.deb`.
pub fn deb_file_name(version: &str) -> String {
    format!("{DEB_PACKAGE}_{version}_amd64.deb")
}

/// A Debian version without epoch: starts with a digit; letters, digits
/// and `. + ~ -` (dpkg's rules, and safe in a file name).
fn check_version(v: &str) -> Result<(), ImageError> {
    let ok = v.starts_with(|c: char| c.is_ascii_digit())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadPackageVersion {
            version: v.to_string(),
        })
    }
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, ImageError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "snowflock-deb-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The package tree being staged, and its installed size.
struct Stage {
    root: PathBuf,
    bytes_kib: u64,
}

impl Stage {
    /// Creates the directories of `dest` (absolute inside the package)
    /// with mode 0755 and returns its host path.
    fn path(&mut self, dest: &str) -> Result<PathBuf, ImageError> {
        let rel = dest.trim_start_matches('/');
        let mut dir = self.root.clone();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            dir.push(part);
            if !dir.is_dir() {
                fs::create_dir(&dir).map_err(io_err("create", &dir))?;
                set_mode(&dir, 0o755)?;
                self.bytes_kib += 1;
            }
        }
        Ok(dir.join(parts[parts.len() - 1]))
    }

    /// Writes `src` at `dest` with permission bits `mode`.
    fn file(&mut self, dest: &str, mode: u32, src: Source) -> Result<(), ImageError> {
        let path = self.path(dest)?;
        let len = match src {
            Source::Bytes(b) => {
                fs::write(&path, &b).map_err(io_err("write", &path))?;
                b.len() as u64
            }
            Source::Path(p) => fs::copy(&p, &path).map_err(io_err("copy", &p))?,
        };
        set_mode(&path, mode)?;
        self.bytes_kib += len.div_ceil(1024);
        Ok(())
    }

    fn text(&mut self, dest: &str, mode: u32, text: &str) -> Result<(), ImageError> {
        self.file(dest, mode, Source::Bytes(text.as_bytes().to_vec()))
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

/// `DEBIAN/control`.
fn control(version: &str, installed_kib: u64, with_lib: bool) -> String {
    let depends = if with_lib {
        format!("Depends: {LIBC_DEPENDS}\n")
    } else {
        String::new()
    };
    format!(
        "\
Package: {DEB_PACKAGE}
Version: {version}
Architecture: amd64
Maintainer: snowflock developers <snowflock@localhost>
Installed-Size: {installed_kib}
{depends}Recommends: python3
Section: admin
Priority: optional
Description: snowflock guest agent: VM fork for clusters
 snowflock clones a running VM into many, on one host or across a
 cluster: a program calls sf_clone() and N copies of the whole VM resume
 at that instruction, each with its own clone ID, on a private network.
 .
 This package is the guest side: snowflock-agent (a systemd service)
 talks to the host daemon over a virtio-serial port and gives the VM and
 its clones their identity; sf is the API from the shell; libsnowflock.so
 and snowflock.h the API for C; snowflock.py the API for Python.
"
    )
}

/// Builds `snowflock-guest_<version>_amd64.deb` in `opts.out_dir` and
/// returns its path. Refuses without the agent or `sf` binary
/// ([`ImageError::MissingAgent`], [`ImageError::MissingInput`]) or without
/// `dpkg-deb` ([`ImageError::MissingTool`]).
pub fn build_guest_deb(opts: &DebOptions) -> Result<PathBuf, ImageError> {
    check_version(&opts.version)?;
    let agent = opts.guest_bin_dir.join(AGENT_BIN);
    if !agent.is_file() {
        return Err(ImageError::MissingAgent { path: agent });
    }
    let sf = opts.guest_bin_dir.join(SF_BIN);
    input_file("sf binary", &sf)?;
    for b in MPI_BINS {
        input_file("guest binary", &opts.guest_bin_dir.join(b))?;
    }
    // The optional libraries in `lib_dir`; a missing one is a warning.
    let optional = |name: &str, without: &str| {
        let found = opts
            .lib_dir
            .as_ref()
            .map(|d| d.join(name))
            .filter(|l| l.is_file());
        if found.is_none() {
            tracing::warn!("No {name} given: {without}");
        }
        found
    };
    let lib = optional(LIB, "the package has no C library");
    let shim = optional(
        MPI_SHIM,
        "MPICH jobs under sfmpirun may hang in MPI_Finalize",
    );
    for (what, p) in [
        ("Header", &opts.header),
        ("Python module", &opts.python_module),
    ] {
        if let Some(p) = p {
            input_file(what, p)?;
        }
    }

    let tmp = TempDir::new()?;
    let mut st = Stage {
        root: tmp.0.join("pkg"),
        bytes_kib: 0,
    };
    fs::create_dir(&st.root).map_err(io_err("create", &st.root))?;
    set_mode(&st.root, 0o755)?;
    st.file("/usr/sbin/snowflock-agent", 0o755, stripped(agent))?;
    st.file("/usr/bin/sf", 0o755, stripped(sf))?;
    for b in MPI_BINS {
        st.file(
            &format!("/usr/bin/{b}"),
            0o755,
            stripped(opts.guest_bin_dir.join(b)),
        )?;
    }
    if let Some(l) = &lib {
        st.file(
            "/usr/lib/x86_64-linux-gnu/libsnowflock.so",
            0o644,
            stripped(l.clone()),
        )?;
    }
    if let Some(l) = &shim {
        st.file(MPI_SHIM_PATH, 0o644, stripped(l.clone()))?;
    }
    let given = |p: &Option<PathBuf>, builtin: &str| match p {
        Some(p) => Source::Path(p.clone()),
        None => Source::Bytes(builtin.as_bytes().to_vec()),
    };
    st.file(
        "/usr/include/snowflock.h",
        0o644,
        given(&opts.header, HEADER),
    )?;
    st.file(
        "/usr/lib/python3/dist-packages/snowflock.py",
        0o644,
        given(&opts.python_module, PYTHON_MODULE),
    )?;
    st.text(
        &format!("/lib/systemd/system/{}", deb_files::UNIT_NAME),
        0o644,
        deb_files::UNIT,
    )?;
    st.text("/etc/snowflock/agent.toml", 0o644, &deb_files::agent_toml())?;
    st.text(
        "/usr/lib/modules-load.d/snowflock.conf",
        0o644,
        deb_files::MODULES_LOAD,
    )?;
    let doc = format!("/usr/share/doc/{DEB_PACKAGE}");
    st.text(&format!("{doc}/copyright"), 0o644, &deb_files::copyright())?;
    st.text(&format!("{doc}/README.Debian"), 0o644, deb_files::README)?;

    // The control area; its size does not count as installed.
    let installed = st.bytes_kib;
    st.text(
        "/DEBIAN/control",
        0o644,
        &control(&opts.version, installed, lib.is_some()),
    )?;
    st.text("/DEBIAN/conffiles", 0o644, "/etc/snowflock/agent.toml\n")?;
    st.text("/DEBIAN/postinst", 0o755, deb_files::POSTINST)?;
    st.text("/DEBIAN/prerm", 0o755, deb_files::PRERM)?;
    st.text("/DEBIAN/postrm", 0o755, deb_files::POSTRM)?;
    if lib.is_some() {
        st.text("/DEBIAN/triggers", 0o644, deb_files::TRIGGERS)?;
    }

    fs::create_dir_all(&opts.out_dir).map_err(io_err("create", &opts.out_dir))?;
    let out = opts.out_dir.join(deb_file_name(&opts.version));
    let part = opts.out_dir.join(format!(
        ".{}.part-{}",
        deb_file_name(&opts.version),
        std::process::id()
    ));
    let res = dpkg_deb_build(&opts.dpkg_deb, &st.root, &part)
        .and_then(|()| fs::rename(&part, &out).map_err(io_err("rename", &part)));
    if res.is_err() {
        let _ = fs::remove_file(&part);
    }
    res?;
    tracing::info!("Built {}", out.display());
    Ok(out)
}

/// `dpkg-deb --build` of `root` into `part`.
fn dpkg_deb_build(dpkg_deb: &Path, root: &Path, part: &Path) -> Result<(), ImageError> {
    let mut cmd = Command::new(dpkg_deb);
    // Reproducible: archive member times and file times clamped to a fixed
    // epoch, so the same files make the same package, byte for byte, and
    // an image built from it is found up to date.
    cmd.args(["--root-owner-group", "-Zxz", "--build"])
        .arg(root)
        .arg(part)
        .env("SOURCE_DATE_EPOCH", REPRODUCIBLE_EPOCH);
    let res = cmd.output();
    let output = match res {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ImageError::MissingTool {
                tool: dpkg_deb.display().to_string(),
                package: "dpkg",
            })
        }
        Err(e) => return Err(io_err("run", dpkg_deb)(e)),
    };
    if output.status.success() {
        return Ok(());
    }
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    Err(ImageError::Tool {
        what: "Building the guest package".into(),
        cmd: format!("{} {}", dpkg_deb.display(), args.join(" ")),
        status: format!("ended with {}", output.status),
        tail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn have_dpkg_deb() -> bool {
        Command::new("dpkg-deb").arg("--version").output().is_ok()
    }

    /// A guest bin dir with fake binaries and a fake library.
    fn fake_bins(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        for (name, text) in [
            (AGENT_BIN, "#!/bin/sh\necho agent\n"),
            (SF_BIN, "#!/bin/sh\necho sf\n"),
            ("sf-exec", "#!/bin/sh\necho sf-exec\n"),
            ("sfmpirun", "#!/bin/sh\necho sfmpirun\n"),
            (LIB, "not really a library\n"),
            (MPI_SHIM, "not really a shim\n"),
        ] {
            fs::write(dir.join(name), text).unwrap();
            set_mode(&dir.join(name), 0o700).unwrap();
        }
    }

    fn dpkg_deb(args: &[&str], deb: &Path) -> String {
        let out = Command::new("dpkg-deb")
            .args(args)
            .arg(deb)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `dpkg-deb -e` (control area) or `-x` (files) of `deb` into `dir`.
    fn extract(what: &str, deb: &Path, dir: &Path) {
        let ok = Command::new("dpkg-deb")
            .arg(what)
            .arg(deb)
            .arg(dir)
            .status()
            .unwrap();
        assert!(ok.success(), "dpkg-deb {what} failed");
    }

    /// `dpkg-deb -c`: path -> (mode string, owner).
    fn contents(deb: &Path) -> BTreeMap<String, (String, String)> {
        dpkg_deb(&["-c"], deb)
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let path = f[5].trim_start_matches('.').to_string();
                (path, (f[0].to_string(), f[1].to_string()))
            })
            .collect()
    }

    #[test]
    fn builds_a_package_dpkg_accepts() {
        if !have_dpkg_deb() {
            eprintln!("skipped: no dpkg-deb");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let bins = tmp.path().join("bins");
        fake_bins(&bins);
        let mut o = DebOptions::new(tmp.path().join("out"), &bins);
        o.lib_dir = Some(bins.clone());
        let deb = build_guest_deb(&o).unwrap();
        assert_eq!(
            deb,
            tmp.path()
                .join("out")
                .join(format!("snowflock-guest_{DEB_VERSION}_amd64.deb"))
        );
        // Nothing else is left in the output directory.
        assert_eq!(fs::read_dir(tmp.path().join("out")).unwrap().count(), 1);

        let info = dpkg_deb(&["-I"], &deb);
        for field in [
            "Package: snowflock-guest",
            &format!("Version: {DEB_VERSION}"),
            "Architecture: amd64",
            "Maintainer: snowflock developers <snowflock@localhost>",
            "Depends: libc6 (>= 2.34)",
            "Recommends: python3",
            "Section: admin",
            "Priority: optional",
            "Description: snowflock guest agent",
            "Installed-Size: ",
        ] {
            assert!(info.contains(field), "{field:?} missing from\n{info}");
        }
        for script in ["postinst", "prerm", "postrm", "triggers", "conffiles"] {
            assert!(info.contains(script), "{script} missing from\n{info}");
        }
        let ctrl = tmp.path().join("ctrl");
        extract("-e", &deb, &ctrl);
        assert_eq!(
            fs::read_to_string(ctrl.join("conffiles")).unwrap(),
            "/etc/snowflock/agent.toml\n"
        );
        for s in ["postinst", "prerm", "postrm"] {
            let m = fs::metadata(ctrl.join(s)).unwrap().permissions().mode();
            assert_eq!(m & 0o777, 0o755, "{s}");
        }

        let files = contents(&deb);
        for (path, mode) in [
            ("/usr/sbin/snowflock-agent", "-rwxr-xr-x"),
            ("/usr/bin/sf", "-rwxr-xr-x"),
            ("/usr/bin/sf-exec", "-rwxr-xr-x"),
            ("/usr/bin/sfmpirun", "-rwxr-xr-x"),
            ("/usr/lib/x86_64-linux-gnu/libsnowflock.so", "-rw-r--r--"),
            (MPI_SHIM_PATH, "-rw-r--r--"),
            ("/usr/include/snowflock.h", "-rw-r--r--"),
            ("/usr/lib/python3/dist-packages/snowflock.py", "-rw-r--r--"),
            ("/lib/systemd/system/snowflock-agent.service", "-rw-r--r--"),
            ("/etc/snowflock/agent.toml", "-rw-r--r--"),
            ("/usr/lib/modules-load.d/snowflock.conf", "-rw-r--r--"),
            ("/usr/share/doc/snowflock-guest/copyright", "-rw-r--r--"),
            ("/usr/share/doc/snowflock-guest/README.Debian", "-rw-r--r--"),
            ("/etc/snowflock/", "drwxr-xr-x"),
        ] {
            let (m, owner) = files
                .get(path)
                .unwrap_or_else(|| panic!("{path} missing from {files:?}"));
            assert_eq!(m, mode, "{path}");
            assert_eq!(owner, "root/root", "{path}");
        }
        assert!(files.keys().all(|p| !p.starts_with("/DEBIAN")));

        // The files hold what they should.
        let x = tmp.path().join("x");
        extract("-x", &deb, &x);
        let read = |p: &str| fs::read_to_string(x.join(p)).unwrap();
        assert_eq!(read("usr/sbin/snowflock-agent"), "#!/bin/sh\necho agent\n");
        assert_eq!(read("usr/include/snowflock.h"), HEADER);
        assert_eq!(
            read("usr/lib/python3/dist-packages/snowflock.py"),
            PYTHON_MODULE
        );
        assert_eq!(read("etc/snowflock/agent.toml"), deb_files::agent_toml());
        assert!(read("lib/systemd/system/snowflock-agent.service")
            .contains("ExecStart=/usr/sbin/snowflock-agent --boot-identity\n"));

        // A second build replaces the first.
        build_guest_deb(&o).unwrap();
        assert_eq!(fs::read_dir(tmp.path().join("out")).unwrap().count(), 1);
    }

    #[test]
    fn without_the_library_there_is_no_libc_dependency() {
        if !have_dpkg_deb() {
            eprintln!("skipped: no dpkg-deb");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let bins = tmp.path().join("bins");
        fake_bins(&bins);
        fs::remove_file(bins.join(LIB)).unwrap();
        let mut o = DebOptions::new(tmp.path(), &bins);
        o.lib_dir = Some(bins.clone());
        o.version = "1.2.3~rc1".into();
        let header = tmp.path().join("my.h");
        fs::write(&header, "/* mine */\n").unwrap();
        o.header = Some(header);
        let deb = build_guest_deb(&o).unwrap();
        assert!(deb.ends_with("snowflock-guest_1.2.3~rc1_amd64.deb"));
        let info = dpkg_deb(&["-I"], &deb);
        assert!(
            !info.contains("Depends:") && !info.contains("triggers"),
            "{info}"
        );
        let files = contents(&deb);
        assert!(!files.contains_key("/usr/lib/x86_64-linux-gnu/libsnowflock.so"));
        let x = tmp.path().join("x");
        extract("-x", &deb, &x);
        assert_eq!(
            fs::read_to_string(x.join("usr/include/snowflock.h")).unwrap(),
            "/* mine */\n"
        );
    }

    #[test]
    fn refuses_clearly() {
        let tmp = tempfile::tempdir().unwrap();
        let bins = tmp.path().join("bins");
        let o = DebOptions::new(tmp.path().join("out"), &bins);
        let e = build_guest_deb(&o).unwrap_err();
        assert!(matches!(e, ImageError::MissingAgent { .. }), "{e:?}");
        assert!(e.to_string().contains("snowflock-agent is missing"));

        fake_bins(&bins);
        fs::remove_file(bins.join(SF_BIN)).unwrap();
        let e = build_guest_deb(&o).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("sf binary not found: {}/sf is missing", bins.display())
        );

        fake_bins(&bins);
        let mut o2 = o.clone();
        o2.python_module = Some(tmp.path().join("nope.py"));
        let e = build_guest_deb(&o2).unwrap_err();
        assert!(matches!(e, ImageError::MissingInput { .. }), "{e:?}");

        let mut o2 = o.clone();
        o2.dpkg_deb = tmp.path().join("no-dpkg-deb");
        let e = build_guest_deb(&o2).unwrap_err();
        assert!(matches!(e, ImageError::MissingTool { .. }), "{e:?}");
        assert!(e.to_string().ends_with("not found (install dpkg)"), "{e}");

        for bad in ["", "v1", "1/2", "1:2.0", "1 2"] {
            let mut o2 = o.clone();
            o2.version = bad.into();
            let e = build_guest_deb(&o2).unwrap_err();
            assert!(matches!(e, ImageError::BadPackageVersion { .. }), "{bad:?}");
        }

        // dpkg-deb itself failing: its message, nothing left behind.
        let fail = tmp.path().join("fail.sh");
        fs::write(&fail, "#!/bin/sh\necho 'broken control' >&2\nexit 2\n").unwrap();
        set_mode(&fail, 0o755).unwrap();
        let mut o2 = o.clone();
        o2.dpkg_deb = fail;
        let e = build_guest_deb(&o2).unwrap_err();
        assert!(matches!(e, ImageError::Tool { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("Building the guest package failed: `"),
            "{msg}"
        );
        assert!(msg.ends_with(":\nbroken control"), "{msg}");
        assert_eq!(fs::read_dir(tmp.path().join("out")).unwrap().count(), 0);
    }
}
