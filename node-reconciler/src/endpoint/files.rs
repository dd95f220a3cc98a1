//! Crash-safe file writes, for the state directory and the CNI install.
//!
//! A file is durable once its data and the directory entry naming it are
//! both on disk: hence `fsync` of the file, then of its directory. Not every
//! write needs both (an `fsync` costs a disk flush): [`Durability`] says
//! what a replacement must survive, and [`create_exclusive`] leaves the
//! directory to the caller, who syncs it once for several files. What each
//! state file needs, and why, is in [`super::store`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Prefix and suffix of temporary files: hidden and without a `.conf`,
/// `.conflist` or `.json` ending, so no runtime loads a half-written
/// configuration and no loader takes them for records.
const TMP_PREFIX: &str = ".";
const TMP_SUFFIX: &str = ".tmp";

/// The temporary name `replace` uses for `path`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!("{TMP_PREFIX}{name}{TMP_SUFFIX}"))
}

/// Whether `name` is a temporary file `replace` left behind.
pub fn is_tmp(name: &str) -> bool {
    name.starts_with(TMP_PREFIX) && name.ends_with(TMP_SUFFIX)
}

/// Flushes a directory's entries (a create, rename or unlink in it).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What a [`replace`] must survive. A running system always sees the old
/// file or the new one, never a part: the difference is only what an
/// operating system crash (power loss) may leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The new file, once `replace` returns: its data and its directory
    /// are synced (two flushes).
    Durable,
    /// The old file or the new one, whole: its data is synced before the
    /// rename (one flush), but the rename may be lost.
    Whole,
    /// Anything, even an empty or missing file: nothing is synced. For
    /// hints only, whose loss costs nothing.
    Hint,
}

/// Replaces `path` with `content` atomically: a reader sees the old or the
/// new file, never a part; after a crash what `durability` says. `mode` is
/// set before the rename.
pub fn replace(path: &Path, content: &[u8], mode: u32, durability: Durability) -> io::Result<()> {
    let dir = parent(path);
    let tmp = tmp_path(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(content)?;
        // The umask may have narrowed `mode` at creation.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        if durability != Durability::Hint {
            f.sync_all()?;
        }
        drop(f);
        fs::rename(&tmp, path)?;
        if durability == Durability::Durable {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Replaces `path` with `content` atomically and durably (see [`replace`]).
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    replace(path, content, mode, Durability::Durable)
}

/// `write_atomic` unless `path` already holds exactly `content` with
/// `mode`; returns whether it wrote.
pub fn write_if_changed(path: &Path, content: &[u8], mode: u32) -> io::Result<bool> {
    let same_content = match fs::read(path) {
        Ok(old) => old == content,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    let same_mode = fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777 == mode)
        .unwrap_or(false);
    if same_content && same_mode {
        return Ok(false);
    }
    write_atomic(path, content, mode)?;
    Ok(true)
}

/// Creates `path` holding `content`, failing with `AlreadyExists` if it
/// exists (`O_EXCL`): two writers can never both own it. Its data is synced
/// when this returns; it is durable once its directory is synced too
/// ([`sync_dir`]), which the caller does once for all the files it made.
pub fn create_exclusive(path: &Path, content: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)?;
    let written = f.write_all(content).and_then(|()| f.sync_all());
    if let Err(e) = written {
        drop(f);
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

/// Removes `path` durably; a file already gone is success.
pub fn remove_durably(path: &Path) -> io::Result<()> {
    if remove(path)? {
        sync_dir(parent(path))?;
    }
    Ok(())
}

/// Removes `path`; a file already gone is success. Nothing is synced: after
/// an operating system crash the file may be back. Returns whether it was
/// there.
pub fn remove(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn atomic_writes_replace_and_skip_what_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10-x.conflist");
        assert!(write_if_changed(&path, b"one", 0o644).unwrap());
        assert!(!write_if_changed(&path, b"one", 0o644).unwrap());
        assert!(
            write_if_changed(&path, b"one", 0o755).unwrap(),
            "mode differs"
        );
        assert!(write_if_changed(&path, b"two", 0o755).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["10-x.conflist"], "no temporary file left");
        assert!(is_tmp(
            &tmp_path(&path).file_name().unwrap().to_string_lossy()
        ));
    }

    #[test]
    fn exclusive_creation_has_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10.244.1.1");
        create_exclusive(&path, b"a").unwrap();
        let err = create_exclusive(&path, b"b").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"a");
        remove_durably(&path).unwrap();
        remove_durably(&path).unwrap();
        assert!(!path.exists());
        create_exclusive(&path, b"c").unwrap();
        assert!(remove(&path).unwrap());
        assert!(!remove(&path).unwrap(), "already gone");
    }

    #[test]
    fn every_durability_replaces_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        for (n, durability) in [Durability::Durable, Durability::Whole, Durability::Hint]
            .into_iter()
            .enumerate()
        {
            let content = format!("{n}");
            replace(&path, content.as_bytes(), 0o600, durability).unwrap();
            assert_eq!(fs::read(&path).unwrap(), content.as_bytes());
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
                0o600
            );
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no tmp left");
    }
}
