//! Fixed files of the guest package `snowflock-guest` (see
//! [`build_guest_deb`](crate::build_guest_deb)):
//! the systemd unit, the agent's documented `agent.toml`, the
//! modules-load list, the maintainer scripts and the copyright file.
//!
//! The maintainer scripts follow what debhelper generates for a unit
//! (enable on install, restart on upgrade, stop on removal, forget on
//! purge), with a fallback to plain `systemctl` when `init-system-helpers`
//! is missing. They work in a chroot where systemd is not running (an
//! image build): they only start or stop the unit when
//! `/run/systemd/system` exists, and `systemctl enable` works offline.
//! They call every tool through `PATH` (never an absolute path), so the
//! unit tests can run them against stubs.

/// The unit's file name.
pub const UNIT_NAME: &str = "snowflock-agent.service";

/// `/lib/systemd/system/snowflock-agent.service`.
///
/// `Type=notify`: the agent tells systemd it is ready once its boot
/// identity is applied and its API socket listens, so `network.target`
/// (it configures the NIC) and whatever is ordered after it see the VM's
/// name and address. It starts after `sysinit.target` (local file
/// systems, modules, udev, and `systemd-tmpfiles-setup`, which empties
/// `/tmp` at boot: a job started by `vm exec` as soon as the agent answers
/// must not lose its files to it) and is restarted forever: its
/// channel to the host is the VM's only link to snowflock. Reload sends
/// `SIGHUP` with the shell's `kill` (procps may not be installed). No
/// sandboxing:
/// it sets the hostname, machine-id and network, and `snowflock vm exec`
/// runs commands as root through it.
pub const UNIT: &str = "\
[Unit]
Description=snowflock guest agent (VM fork API)
Documentation=file:/usr/share/doc/snowflock-guest/README.Debian
DefaultDependencies=no
After=sysinit.target
Wants=network.target
Before=network.target shutdown.target
Conflicts=shutdown.target
StartLimitIntervalSec=0

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/sbin/snowflock-agent --boot-identity
ExecReload=/bin/sh -c 'kill -HUP \"$MAINPID\"'
Restart=always
RestartSec=1
Environment=HOME=/root

[Install]
WantedBy=multi-user.target
";

/// The documentation part of `/etc/snowflock/agent.toml` in the package,
/// before the `[hooks]` table of [`crate::rootfs::AGENT_TOML`].
const AGENT_TOML_HEAD: &str = "\
# /etc/snowflock/agent.toml: settings of the snowflock guest agent
# (snowflock-agent.service, package snowflock-guest).
#
# Every key is optional; a missing key takes the default shown. The agent
# reads this file at start and again on SIGHUP
# (`systemctl reload snowflock-agent`). Each table is read on its own: a
# table with a mistake is logged (journalctl -u snowflock-agent) and the
# previous good one is kept; the other tables still apply.

# [hooks]: run by the agent right before each clone, so that memory the
# parent does not need is reported free to the host and never copied to
# the clones. Read afresh at every clone (no reload needed).
#   drop_caches  sync, then drop the page cache, dentries and inodes
#   compact      compact free memory into whole reportable blocks
#   malloc_trim  malloc_trim(0) in the agent itself
";

/// The documentation after the `[hooks]` table.
const AGENT_TOML_TAIL: &str = "
# [balloon]: virtio-balloon free page reporting (free guest pages become
# holes on the host, which clones never fetch).
#   free_page_reporting  false unbinds the virtio_balloon driver: nothing
#                        is reported
#   reporting_order      free blocks of 2^order pages and larger are
#                        reported, 0 to 10; unset leaves the kernel's value
#                        (0 once the agent's boot identity ran)
#[balloon]
#free_page_reporting = true
#reporting_order = 0

# [network]: the interface the host's NIC appears as. The agent gives it
# the VM's MAC and address at boot (the sf.mac and sf.ip kernel
# parameters) and a clone's at sf_clone. Boot with net.ifnames=0 to keep
# the kernel's name eth0, or name the interface here (enp0s2, ens3, ...).
# Leave it unconfigured in /etc/network/interfaces and other network
# managers: snowflock assigns its addresses.
#[network]
#interface = \"eth0\"
";

/// `/etc/snowflock/agent.toml` (a conffile): the initramfs image's settings
/// ([`crate::rootfs::AGENT_TOML`]) with every table documented.
pub fn agent_toml() -> String {
    format!(
        "{AGENT_TOML_HEAD}{}{AGENT_TOML_TAIL}",
        crate::rootfs::AGENT_TOML
    )
}

/// `/usr/lib/modules-load.d/snowflock.conf`.
pub const MODULES_LOAD: &str = "\
# Kernel modules the snowflock agent relies on, loaded at boot by
# systemd-modules-load (package snowflock-guest). udev usually loads them
# for their devices already; this makes it certain.
# The agent's virtio-serial channel to the host daemon.
virtio_console
# Entropy from the host.
virtio_rng
# Free page reporting: free guest pages are never copied to clones.
virtio_balloon
# The NIC the agent gives the VM's (and each clone's) MAC and address.
virtio_net
";

/// `DEBIAN/postinst`: enable the unit (also in a chroot); start it on
/// install, restart it on upgrade, when systemd runs.
pub const POSTINST: &str = r#"#!/bin/sh
# postinst of snowflock-guest: enable snowflock-agent.service and, when
# systemd is running, start it (restart it on upgrade).
set -e
unit=snowflock-agent.service

case "$1" in
configure | abort-upgrade | abort-deconfigure | abort-remove)
    if command -v deb-systemd-helper > /dev/null 2>&1; then
        deb-systemd-helper unmask "$unit" > /dev/null || true
        # was-enabled is true on a first install: enable; on an upgrade
        # keep the admin's choice.
        if deb-systemd-helper --quiet was-enabled "$unit"; then
            deb-systemd-helper enable "$unit" > /dev/null || true
        else
            deb-systemd-helper update-state "$unit" > /dev/null || true
        fi
    elif command -v systemctl > /dev/null 2>&1; then
        # Works offline too (in a chroot it only makes the symlinks).
        systemctl enable "$unit" > /dev/null 2>&1 || true
    fi
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload > /dev/null || true
        if [ -n "$2" ]; then action=restart; else action=start; fi
        if command -v deb-systemd-invoke > /dev/null 2>&1; then
            deb-systemd-invoke "$action" "$unit" > /dev/null || true
        else
            systemctl "$action" "$unit" > /dev/null || true
        fi
    fi
    ;;
esac
exit 0
"#;

/// `DEBIAN/prerm`: stop the unit on removal (an upgrade restarts it in
/// postinst instead).
pub const PRERM: &str = r#"#!/bin/sh
# prerm of snowflock-guest: stop snowflock-agent.service on removal.
set -e
unit=snowflock-agent.service

if [ "$1" = remove ]; then
    if [ -d /run/systemd/system ]; then
        if command -v deb-systemd-invoke > /dev/null 2>&1; then
            deb-systemd-invoke stop "$unit" > /dev/null || true
        else
            systemctl stop "$unit" > /dev/null || true
        fi
    fi
    if ! command -v deb-systemd-helper > /dev/null 2>&1 &&
        command -v systemctl > /dev/null 2>&1; then
        # Without deb-systemd-helper: disable while the unit file exists.
        systemctl disable "$unit" > /dev/null 2>&1 || true
    fi
fi
exit 0
"#;

/// `DEBIAN/postrm`: mask the unit on removal (as debhelper does, so a
/// removed-but-not-purged package stays off), forget it on purge.
pub const POSTRM: &str = r#"#!/bin/sh
# postrm of snowflock-guest.
set -e
unit=snowflock-agent.service

if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload > /dev/null || true
fi
if command -v deb-systemd-helper > /dev/null 2>&1; then
    case "$1" in
    remove)
        deb-systemd-helper mask "$unit" > /dev/null || true
        ;;
    purge)
        deb-systemd-helper purge "$unit" > /dev/null || true
        deb-systemd-helper unmask "$unit" > /dev/null || true
        ;;
    esac
fi
exit 0
"#;

/// `DEBIAN/triggers` when the package has `libsnowflock.so`: dpkg runs
/// `ldconfig` once after the install.
pub const TRIGGERS: &str = "activate-noawait ldconfig\n";

/// `/usr/share/doc/snowflock-guest/copyright`.
pub fn copyright() -> String {
    let license = env!("CARGO_PKG_LICENSE");
    format!(
        "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: snowflock
Comment: the snowflock guest agent, sf, libsnowflock and the snowflock
 Python module, built from the snowflock sources.

Files: *
Copyright: snowflock developers
License: {license}
 On Debian systems, the full text of the {license} license can be
 found in /usr/share/common-licenses/{license}.
"
    )
}

/// `/usr/share/doc/snowflock-guest/README.Debian`: where things are.
pub const README: &str = "\
snowflock-guest for Debian
==========================

This package makes a VM clonable by snowflock (VM fork for clusters).

  /usr/sbin/snowflock-agent      the agent, run by snowflock-agent.service
  /usr/bin/sf                    the API from the shell (sf id, sf ticket, ...)
  /usr/bin/sfmpirun              MPI jobs on clones: sfmpirun -np N prog
  /usr/bin/sf-exec               run a command in a sibling VM (MPI's rsh)
  /usr/lib/x86_64-linux-gnu/libsnowflock.so, /usr/include/snowflock.h
                                 the API for C (-lsnowflock)
  /usr/lib/python3/dist-packages/snowflock.py
                                 the API for Python (import snowflock)
  /etc/snowflock/agent.toml      the agent's settings, documented inside
  /usr/lib/modules-load.d/snowflock.conf
                                 virtio modules loaded at boot

The agent talks to the host daemon over the virtio-serial port named
org.snowflock.agent, and to applications over /run/snowflock/agent.sock.
Started with --boot-identity it gives the VM the hostname, machine-id,
MAC and address the daemon passes on the kernel command line (sf.hostname,
sf.machine_id, sf.mac, sf.ip) on the interface of [network] in agent.toml
(eth0; boot with net.ifnames=0 or name your NIC there).

Check it:  systemctl status snowflock-agent; journalctl -u snowflock-agent; sf id

The full guide is docs/guest-install.md in the snowflock sources.
";

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::process::Command;

    const SCRIPTS: [(&str, &str); 3] =
        [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)];

    #[test]
    fn scripts_parse_and_call_tools_only_through_path() {
        for (name, text) in SCRIPTS {
            let st = Command::new("sh")
                .args(["-n", "-c", text])
                .status()
                .unwrap();
            assert!(st.success(), "{name} does not parse");
            // The tests below run them against stubs in PATH: an absolute
            // tool path would reach the host's.
            for line in text.lines().filter(|l| !l.starts_with("#!")) {
                assert!(!line.contains("bin/"), "{name}: {line}");
            }
            assert!(text.contains("unit=snowflock-agent.service"));
        }
        assert!(UNIT.contains("ExecStart=/usr/sbin/snowflock-agent --boot-identity\n"));
        assert!(UNIT.contains("Restart=always\n") && UNIT.contains("Type=notify\n"));
        assert!(UNIT.contains("WantedBy=multi-user.target\n"));
    }

    /// Runs maintainer script `text` with `args` and only `stubs` in PATH;
    /// returns the stub calls, one a line.
    fn run(dir: &Path, stubs: &[&str], was_enabled: bool, text: &str, args: &[&str]) -> String {
        let bin = dir.join(format!("bin-{}", stubs.join("-")));
        let log = dir.join("calls");
        let _ = std::fs::remove_file(&log);
        std::fs::create_dir_all(&bin).unwrap();
        for s in stubs {
            let p = bin.join(s);
            std::fs::write(
                &p,
                "#!/bin/sh\necho \"${0##*/} $*\" >> \"$STUB_LOG\"\n\
                 case \"$*\" in *was-enabled*) [ \"$WAS_ENABLED\" = 1 ] ;; esac\n",
            )
            .unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let st = Command::new("/bin/sh")
            .arg("-c")
            .arg(text)
            .arg("script")
            .args(args)
            .env_clear()
            .env("PATH", &bin)
            .env("STUB_LOG", &log)
            .env("WAS_ENABLED", if was_enabled { "1" } else { "0" })
            .status()
            .unwrap();
        assert!(st.success(), "{args:?}");
        std::fs::read_to_string(&log).unwrap_or_default()
    }

    #[test]
    fn scripts_enable_and_forget_the_unit() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let helpers = ["deb-systemd-helper", "deb-systemd-invoke", "systemctl"];
        let u = UNIT_NAME;
        // Started only where systemd runs (not in an image build's chroot).
        let systemd = Path::new("/run/systemd/system").is_dir();
        let started = |action: &str| {
            if systemd {
                format!("systemctl --system daemon-reload\ndeb-systemd-invoke {action} {u}\n")
            } else {
                String::new()
            }
        };

        // First install: enabled.
        assert_eq!(
            run(d, &helpers, true, POSTINST, &["configure", ""]),
            format!(
                "deb-systemd-helper unmask {u}\ndeb-systemd-helper --quiet was-enabled {u}\n\
                 deb-systemd-helper enable {u}\n{}",
                started("start")
            )
        );
        // Upgrade of a unit the admin disabled: left disabled.
        assert_eq!(
            run(d, &helpers, false, POSTINST, &["configure", "0.0.9"]),
            format!(
                "deb-systemd-helper unmask {u}\ndeb-systemd-helper --quiet was-enabled {u}\n\
                 deb-systemd-helper update-state {u}\n{}",
                started("restart")
            )
        );
        // No init-system-helpers: plain systemctl.
        let sc = ["systemctl"];
        let plain_start = if systemd {
            format!("systemctl --system daemon-reload\nsystemctl start {u}\n")
        } else {
            String::new()
        };
        assert_eq!(
            run(d, &sc, true, POSTINST, &["configure", ""]),
            format!("systemctl enable {u}\n{plain_start}")
        );
        // Neither: nothing to do, and no failure.
        assert_eq!(run(d, &[], true, POSTINST, &["configure", ""]), "");

        // Removal and purge.
        let stop = if systemd {
            format!("deb-systemd-invoke stop {u}\n")
        } else {
            String::new()
        };
        assert_eq!(run(d, &helpers, true, PRERM, &["remove"]), stop);
        assert_eq!(run(d, &helpers, true, PRERM, &["upgrade", "0.2"]), "");
        let reload = if systemd {
            "systemctl --system daemon-reload\n"
        } else {
            ""
        };
        assert_eq!(
            run(d, &helpers, true, POSTRM, &["remove"]),
            format!("{reload}deb-systemd-helper mask {u}\n")
        );
        assert_eq!(
            run(d, &helpers, true, POSTRM, &["purge"]),
            format!("deb-systemd-helper purge {u}\ndeb-systemd-helper unmask {u}\n")
        );
        let plain_stop = if systemd {
            format!("systemctl stop {u}\n")
        } else {
            String::new()
        };
        assert_eq!(
            run(d, &sc, true, PRERM, &["remove"]),
            format!("{plain_stop}systemctl disable {u}\n")
        );
        assert_eq!(run(d, &sc, true, POSTRM, &["purge"]), "");
    }

    #[test]
    fn agent_toml_keeps_the_initramfs_settings_and_documents_every_table() {
        let t = agent_toml();
        assert!(t.contains(crate::rootfs::AGENT_TOML));
        for table in ["[hooks]", "[balloon]", "[network]"] {
            assert!(t.contains(table), "{table}");
        }
        // Only the [hooks] settings are live; the rest is comments.
        let live: String = t
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(live, crate::rootfs::AGENT_TOML);
        assert!(MODULES_LOAD.lines().any(|l| l == "virtio_console"));
        assert!(copyright().contains("License: Apache-2.0"));
    }
}
