//! The sandbox's bpffs: where each node's `trellis-node` pins its policy maps and links. A
//! real node has `/sys/fs/bpf`; the sandbox's nodes share this machine, so the sandbox mounts
//! one bpf filesystem of its own inside its state directory and gives every node a
//! subdirectory of it.
//!
//! ```text
//!  mount -t bpf trellis-bpffs <state>/bpffs          ControlPlane::start (with the datapath)
//!  <state>/bpffs/<node>/                             NodeDirs::bpffs, made with the node's dirs
//!      v1/…  (maps and links, pinned by its trellis-node --bpffs-root)
//!  umount <state>/bpffs                              stop, down, reset, a failed start
//! ```
//!
//! Nothing about the mount is recorded: its path is fixed, so teardown finds it by path in
//! `/proc/self/mountinfo`, also after a crash, and unmounts exactly that (every mount stacked
//! there, should there be several). A directory with a mount inside is never wiped (see
//! [`Sandbox::remove`](crate::Sandbox::remove)): `remove_dir_all` would walk into it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::error::{Error, Result};

/// The mount's source name, as `mount` and `/proc/self/mountinfo` show it.
pub const SOURCE: &str = "trellis-bpffs";
/// The filesystem type.
pub const FSTYPE: &str = "bpf";
/// Where the kernel lists this process's mounts.
const MOUNTINFO: &str = "/proc/self/mountinfo";
/// More mounts stacked on one path than any sandbox run makes: unmounting stops there.
const MAX_STACKED: usize = 16;

/// One line of `/proc/self/mountinfo`: what is mounted where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Every mount this process sees.
pub fn mounts() -> Result<Vec<Mount>> {
    let text = std::fs::read_to_string(MOUNTINFO).map_err(|e| Error::io("read", MOUNTINFO, e))?;
    Ok(parse_mountinfo(&text))
}

/// The mounts of a `mountinfo` text (lines it cannot read are skipped). Its format
/// (proc(5)): `id parent major:minor root mount-point options [optional…] - fstype source
/// super-options`, with space, tab, newline and backslash in paths written as `\ooo`.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let mount_point = fields.get(4)?;
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(Mount {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: (*fields.get(dash + 1)?).to_string(),
                source: unescape(fields.get(dash + 2)?),
            })
        })
        .collect()
}

/// Undo mountinfo's `\ooo` escapes.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match octal {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `dir` as mountinfo spells it (symbolic links resolved); itself if it does not exist.
fn canonical(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// How many of the sandbox's bpf filesystems (type [`FSTYPE`], source [`SOURCE`]) are
/// mounted exactly at `dir`.
pub fn mounted_at(dir: &Path) -> Result<usize> {
    let dir = canonical(dir);
    Ok(mounts()?
        .iter()
        .filter(|m| m.mount_point == dir && m.fstype == FSTYPE && m.source == SOURCE)
        .count())
}

/// Whether one of the sandbox's bpf filesystems is mounted at `dir`.
pub fn is_mounted(dir: &Path) -> Result<bool> {
    Ok(mounted_at(dir)? > 0)
}

/// Mount points below `dir` (not `dir` itself), of any filesystem.
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = canonical(dir);
    Ok(mounts()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(&dir) && *p != dir)
        .collect())
}

/// Mount a bpf filesystem named [`SOURCE`] at `dir` (created if missing), unless one is
/// mounted there already. Returns whether it mounted one.
pub fn mount(dir: &Path) -> Result<bool> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    if is_mounted(dir)? {
        return Ok(false);
    }
    let path = dir.display().to_string();
    run(&["-t", FSTYPE, SOURCE, &path], "mount").map_err(|e| match e {
        Error::Command {
            command,
            reason,
            stderr,
        } if {
            let stderr = stderr.to_ascii_lowercase();
            stderr.contains("permission denied") || stderr.contains("must be superuser")
        } =>
        {
            Error::Command {
                command,
                reason: format!(
                    "{reason} (mounting bpffs needs root, like the rest of the datapath; without \
                     it: `trellis-sandbox up --no-datapath`, StartOptions::datapath = false)"
                ),
                stderr,
            }
        }
        e => e,
    })?;
    Ok(true)
}

/// Unmount every bpf filesystem the sandbox mounted at `dir` (source [`SOURCE`]), by that
/// path; nothing else is touched. Returns how many there were; none (or no such directory)
/// is fine.
pub fn unmount(dir: &Path) -> Result<usize> {
    let path = canonical(dir).display().to_string();
    let mut unmounted = 0;
    while is_mounted(dir)? {
        if unmounted == MAX_STACKED {
            return Err(Error::Command {
                command: format!("umount {path}"),
                reason: format!("left a bpffs mounted there after {MAX_STACKED} unmounts"),
                stderr: String::new(),
            });
        }
        run(&[&path], "umount")?;
        unmounted += 1;
    }
    Ok(unmounted)
}

fn run(args: &[&str], program: &str) -> Result<()> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Command {
            command: command.clone(),
            reason: format!("cannot be run: {e}"),
            stderr: String::new(),
        })?;
    if !output.status.success() {
        return Err(Error::Command {
            command,
            reason: format!("exited with {}", output.status),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "\
22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw
35 22 0:30 / /sys/fs/bpf rw,nosuid shared:14 - bpf bpf rw,mode=700
412 28 0:61 / /tmp/trellis\\040e2e/bpffs rw,relatime shared:220 - bpf trellis-bpffs rw
413 28 0:62 / /tmp/no-dash rw
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 3, "{mounts:?}");
        assert_eq!(
            mounts[2],
            Mount {
                mount_point: PathBuf::from("/tmp/trellis e2e/bpffs"),
                fstype: "bpf".into(),
                source: "trellis-bpffs".into(),
            }
        );
        assert_eq!(mounts[1].fstype, "bpf");
        assert_eq!(mounts[0].mount_point, PathBuf::from("/sys"));
    }

    #[test]
    fn escapes() {
        assert_eq!(unescape("a\\040b\\011c\\134d"), "a b\tc\\d");
        assert_eq!(unescape("plain\\"), "plain\\");
        assert_eq!(unescape("\\09x"), "\\09x");
    }

    #[test]
    fn nothing_is_mounted_in_a_fresh_directory() {
        let tmp = tempfile::Builder::new()
            .prefix("trellis-bpffs-")
            .tempdir()
            .unwrap();
        assert!(!is_mounted(tmp.path()).unwrap());
        assert!(mounts_under(tmp.path()).unwrap().is_empty());
        assert_eq!(unmount(&tmp.path().join("missing")).unwrap(), 0);
        // The root has mounts below it.
        assert!(!mounts_under(Path::new("/")).unwrap().is_empty());
    }
}
