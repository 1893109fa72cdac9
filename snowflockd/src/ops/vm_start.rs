//! `vm start`: checks a user's request, boots an original VM and waits for
//! its agent.

use crate::lifecycle::daemon::{random_hex, DaemonError};
use crate::lifecycle::Daemon;
use crate::state::vm::{DiskPlan, Format, MemSource, Vm, VmSpec};
use snowflock_proto::admin::Accel;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a user asks `vm start` for.
pub struct StartRequest {
    pub name: String,
    pub image: String,
    pub mem_mib: u32,
    pub vcpus: u32,
    pub accel: Accel,
    /// The user's own disk.
    pub disk: Option<String>,
    /// Kernel and initrd instead of the image's.
    pub kernel: Option<String>,
    pub initrd: Option<String>,
}

/// What a VM boots: kernel, initrd, the command line to start from, the
/// disk.
struct Boot {
    image_dir: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    cmdline: String,
    disk: Option<DiskPlan>,
}

/// Resolves the request's image, kernel, initrd and disk; the user's disk
/// is checked with `qemu-img` (format, backing chain).
async fn boot_of(req: &StartRequest) -> Result<Boot, DaemonError> {
    let bad = |m: &str| DaemonError::BadRequest(m.to_string());
    let img = if req.image.is_empty() {
        None
    } else {
        let dir = PathBuf::from(&req.image);
        let img = snowflock_image::Image::open(&dir)?;
        Some(img)
    };
    let pick =
        |given: &Option<String>, from_img: Option<PathBuf>, what: &str| match (given, from_img) {
            (Some(p), _) => {
                let p = PathBuf::from(p);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(bad(&format!("The {what} {} is not a file", p.display())))
                }
            }
            (None, Some(p)) => Ok(p),
            (None, None) => Err(bad(&format!(
                "No {what}: give an image directory or --{what}"
            ))),
        };
    let kernel = pick(
        &req.kernel,
        img.as_ref().map(|i| i.kernel.clone()),
        "kernel",
    )?;
    let initrd = pick(
        &req.initrd,
        img.as_ref().map(|i| i.initrd.clone()),
        "initrd",
    )?;
    let disk = match (&req.disk, img.as_ref().and_then(|i| i.disk.clone())) {
        (Some(path), _) => {
            let path = PathBuf::from(path);
            let path = std::fs::canonicalize(&path).unwrap_or(path);
            let info = tokio::task::spawn_blocking(move || crate::host::disk::inspect(&path))
                .await
                .map_err(|e| DaemonError::BadRequest(format!("Disk check failed: {e}")))??;
            Some(DiskPlan::Direct {
                path: info.path,
                format: info.format,
            })
        }
        (None, Some(base)) => Some(DiskPlan::Overlay {
            base: std::fs::canonicalize(&base).unwrap_or(base),
            format: Format::Raw,
        }),
        (None, None) => None,
    };
    let cmdline = match &img {
        Some(i) => i.manifest.cmdline.clone(),
        None => snowflock_image::DEBIAN_CMDLINE.to_string(),
    };
    let image_dir = match img {
        Some(i) => std::fs::canonicalize(&i.dir).unwrap_or(i.dir),
        None => PathBuf::new(),
    };
    Ok(Boot {
        image_dir,
        kernel,
        initrd,
        cmdline,
        disk,
    })
}

/// Checks the request's values; returns the accelerator to use.
pub fn check(req: &StartRequest, hw_virt: bool) -> Result<&'static str, DaemonError> {
    let name = &req.name;
    if !snowflock_proto::admin::valid_vm_name(name) {
        return Err(DaemonError::BadRequest(format!(
            "Invalid VM name {name:?}: use 1-48 of a-z, 0-9 and '-', starting with a letter"
        )));
    }
    if !(64..=65536).contains(&req.mem_mib) {
        return Err(DaemonError::BadRequest(format!(
            "Memory must be 64 MiB to 64 GiB, got {} MiB",
            req.mem_mib
        )));
    }
    if !(1..=64).contains(&req.vcpus) {
        return Err(DaemonError::BadRequest(format!(
            "vCPUs must be 1 to 64, got {}",
            req.vcpus
        )));
    }
    if looks_like_clone_name(name) {
        return Err(DaemonError::BadRequest(format!(
            "Invalid VM name {name:?}: names ending in -g<N>c<N> are reserved for clones"
        )));
    }
    Ok(match req.accel {
        Accel::Tcg => "tcg",
        Accel::Kvm => "kvm",
        Accel::Auto if hw_virt => "kvm",
        Accel::Auto => "tcg",
    })
}

/// Boots an original VM; returns once its agent answered.
pub async fn vm_start(d: &Arc<Daemon>, req: StartRequest) -> Result<Arc<Vm>, DaemonError> {
    let accel = check(&req, crate::host::config::host_has_hw_virt())?;
    let boot = boot_of(&req).await?;
    let name = req.name;
    let flock = d.with(|r| {
        if r.vms.contains_key(&name) {
            return Err(DaemonError::VmExists(name.clone()));
        }
        r.purge(Instant::now());
        if r.free_slots(d.cfg.max_vms) == 0 {
            return Err(DaemonError::NoCapacity(format!(
                "This host runs its maximum of {} VMs",
                d.cfg.max_vms
            )));
        }
        Ok(r.alloc_flock(d.flock_slice())?)
    })?;
    // Under TCG the guest calibrates its TSC against emulated timers, which
    // fails on a loaded host and can hang the boot; tell it the rate.
    let tsc = snowflock_image::host_tsc_khz()
        .map(|k| format!(" tsc_early_khz={k}"))
        .unwrap_or_default();
    let cmdline = format!(
        "{}{tsc} sf.vm={name} sf.hostname={name} sf.ip={} sf.mac={} sf.machine_id={}",
        boot.cmdline,
        crate::host::net::ip_cidr(flock, 0),
        crate::host::net::mac(flock, 0),
        random_hex(16)
    );
    let spec = VmSpec {
        name: name.clone(),
        flock,
        clone_id: 0,
        ticket: None,
        parent: name,
        mem_mib: req.mem_mib,
        vcpus: req.vcpus,
        accel: accel.into(),
        image: boot.image_dir,
        kernel: boot.kernel,
        initrd: boot.initrd,
        cmdline,
        origin: None,
        memory: MemSource::Own,
        disk: boot.disk,
    };
    let vm = match d.create_vm(spec).await {
        Ok(vm) => vm,
        Err(e) => {
            d.with(|r| r.flocks.remove(&flock));
            return Err(e);
        }
    };
    if let Err(e) = d
        .wait_agent(&vm, Duration::from_secs(d.cfg.boot_timeout_s))
        .await
    {
        d.stop_vm(&vm).await;
        return Err(e);
    }
    Ok(vm)
}

/// Clone VMs are named `<parent>-g<generation>c<clone id>`.
pub fn looks_like_clone_name(name: &str) -> bool {
    let Some((_, tail)) = name.rsplit_once("-g") else {
        return false;
    };
    let Some((g, c)) = tail.split_once('c') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(g) && digits(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, mem_mib: u32, vcpus: u32) -> StartRequest {
        StartRequest {
            name: name.into(),
            image: "/img".into(),
            mem_mib,
            vcpus,
            accel: Accel::Auto,
            disk: None,
            kernel: None,
            initrd: None,
        }
    }

    #[test]
    fn clone_names_are_reserved() {
        assert!(looks_like_clone_name("web-g1c2"));
        assert!(looks_like_clone_name("a-b-g12c300"));
        assert!(!looks_like_clone_name("web"));
        assert!(!looks_like_clone_name("web-g1"));
        assert!(!looks_like_clone_name("web-gxc1"));
        assert!(!looks_like_clone_name("web-g1c"));
    }

    #[test]
    fn bad_requests_are_clear_errors() {
        let cases = [
            (req("Web", 128, 1), "Invalid VM name"),
            (
                req("web", 32, 1),
                "Memory must be 64 MiB to 64 GiB, got 32 MiB",
            ),
            (req("web", 128, 0), "vCPUs must be 1 to 64, got 0"),
            (req("web-g1c1", 128, 1), "reserved for clones"),
        ];
        for (r, want) in cases {
            let e = check(&r, false).unwrap_err();
            assert!(matches!(e, DaemonError::BadRequest(_)));
            assert!(e.to_string().contains(want), "{e}");
        }
        assert_eq!(check(&req("web", 128, 1), false).unwrap(), "tcg");
        assert_eq!(check(&req("web", 128, 1), true).unwrap(), "kvm");
    }
}
