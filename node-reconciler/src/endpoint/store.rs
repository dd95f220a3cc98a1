//! The state directory: which address belongs to whom, and the endpoint
//! records. The files are the truth; the maps here mirror them, loaded once
//! at start.
//!
//! ```text
//!  <state-dir>/lock                                    flock: one trellis-node per directory
//!  <state-dir>/ipam/<address>                          the owner attachment: O_EXCL create + fsync, then one fsync of ipam/
//!  <state-dir>/ipam-cursors.json                       the last address allocated per family (a hint, never synced)
//!  <state-dir>/endpoints/<containerID>_<ifname>.json   the record: tmp + fsync + rename; removed with an fsync of endpoints/
//! ```
//!
//! An address is taken by creating its file exclusively, so even a store
//! whose maps were wrong could not give it out twice; a restart reads the
//! files back before anything is allocated. Every method blocks on file I/O
//! and takes the one lock: call them from a blocking thread.
//!
//! What is synced, and why that is enough. A crash of the process loses
//! nothing written (the page cache outlives it), so syncing matters only
//! for a crash of the operating system (or a power loss), and that takes
//! every network namespace, veth and route with it: after the reboot no
//! pod holds an address. The files then need to be consistent, not
//! recent:
//!
//! 1. A record's addresses are allocated to it: their files exist and name
//!    it. Were one free, a new pod could get it, and the old record's DEL
//!    would delete the new pod's route. So [`Store::allocate`] syncs the
//!    allocation files and `ipam/` before the record is written, and
//!    [`Store::remove`] removes the record durably (an fsync of
//!    `endpoints/`) before the caller releases its addresses, whose removal
//!    is not synced: a file that comes back names an attachment without a
//!    record, an orphan the next start releases.
//! 2. A record file is whole, never empty or half written (the start
//!    refuses a record it cannot read: its addresses would be unknown), so
//!    [`Store::put`] syncs it before renaming it into place. The rename is
//!    not synced: if the crash loses it, the previous record is back
//!    (`Adding`, rolled back at start) or none is (its addresses are
//!    orphans), and the datapath either described went with the crash.
//! 3. The cursors are a hint: lost, the round robin starts over.
//!
//! So an ADD flushes the disk 4 times for an IPv4 pod (an allocation file,
//! `ipam/`, the record `Adding` and `Ready`; 5 with IPv6) and a DEL twice
//! (the record `Deleting` before its answer, the removal after it).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::sync::{Mutex, MutexGuard, PoisonError};

use ipnet::IpNet;
use nix::fcntl::{Flock, FlockArg};
use trellis_cni::proto::Attachment;

use super::files;
use super::ipam::{self, Cursors, Exhausted, Family};
use super::naming;
use super::record::{Phase, Record};

const LOCK_FILE: &str = "lock";
const IPAM_DIR: &str = "ipam";
const ENDPOINTS_DIR: &str = "endpoints";
const CURSORS_FILE: &str = "ipam-cursors.json";

/// Why the state directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "state directory {} is in use by another trellis-node (it holds the lock on {}); \
         each node needs its own --state-dir",
        dir.display(), dir.join(LOCK_FILE).display()
    )]
    Locked { dir: PathBuf },
    #[error(
        "endpoint record {}: {reason}. Refusing to start, as its addresses could be given out \
         twice; check that pod's network, then move the file away",
        path.display()
    )]
    BadRecord { path: PathBuf, reason: String },
    #[error(
        "record file {} holds container {} interface {}, so container {} interface {} cannot \
         use the same name",
        path.display(), held.container_id, held.ifname, wanted.container_id, wanted.ifname
    )]
    NameClash {
        path: PathBuf,
        held: Attachment,
        wanted: Attachment,
    },
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The open state directory (locked for this process until dropped).
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    state: Mutex<State>,
    _lock: Flock<File>,
}

#[derive(Debug, Default)]
struct State {
    records: BTreeMap<Attachment, Record>,
    /// Owner per allocated address; `None` when its file names none (a
    /// crash between creating and writing it).
    allocations: BTreeMap<IpAddr, Option<Attachment>>,
    cursors: Cursors,
}

impl Store {
    /// Opens (creating) the state directory at `root`, takes its lock, drops
    /// temporary files a crash left, and reads every allocation and record.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for dir in [
            root.to_path_buf(),
            root.join(IPAM_DIR),
            root.join(ENDPOINTS_DIR),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&dir)
                .map_err(io_error("create", &dir))?;
        }
        let lock_path = root.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o644)
            .open(&lock_path)
            .map_err(io_error("open", &lock_path))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            if e == nix::errno::Errno::EWOULDBLOCK {
                StoreError::Locked {
                    dir: root.to_path_buf(),
                }
            } else {
                StoreError::Io {
                    action: "lock",
                    path: lock_path.clone(),
                    source: io::Error::from(e),
                }
            }
        })?;

        let mut state = State {
            cursors: read_cursors(&root.join(CURSORS_FILE)),
            ..State::default()
        };
        let ipam_dir = root.join(IPAM_DIR);
        for (name, path) in list(&ipam_dir)? {
            let Ok(ip) = IpAddr::from_str(&name) else {
                tracing::warn!(file = %path.display(), "not an allocation file; ignored");
                continue;
            };
            let owner = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Attachment>(&b).ok());
            state.allocations.insert(ip, owner);
        }
        let records_dir = root.join(ENDPOINTS_DIR);
        for (name, path) in list(&records_dir)? {
            let bytes = fs::read(&path).map_err(io_error("read", &path))?;
            let record = Record::decode(&bytes).map_err(|reason| StoreError::BadRecord {
                path: path.clone(),
                reason,
            })?;
            if naming::record_file_name(&record.attachment) != name {
                return Err(StoreError::BadRecord {
                    path,
                    reason: format!(
                        "it holds container {} interface {}, whose record has another name",
                        record.attachment.container_id, record.attachment.ifname
                    ),
                });
            }
            state.records.insert(record.attachment.clone(), record);
        }
        Ok(Store {
            root: root.to_path_buf(),
            state: Mutex::new(state),
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic under the lock leaves maps that still mirror the files
        // up to the failed step; carrying on is as safe as a restart.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn record(&self, a: &Attachment) -> Option<Record> {
        self.state().records.get(a).cloned()
    }

    pub fn records(&self) -> Vec<Record> {
        self.state().records.values().cloned().collect()
    }

    /// Records in phase `Ready`.
    pub fn ready_count(&self) -> usize {
        self.state()
            .records
            .values()
            .filter(|r| r.phase == Phase::Ready)
            .count()
    }

    /// Every allocated address and its owner, if the file names one.
    pub fn allocations(&self) -> Vec<(IpAddr, Option<Attachment>)> {
        self.state()
            .allocations
            .iter()
            .map(|(ip, owner)| (*ip, owner.clone()))
            .collect()
    }

    /// The record whose host veth is `name`, if any.
    pub fn owner_of_link(&self, name: &str) -> Option<Attachment> {
        self.state()
            .records
            .values()
            .find(|r| r.host_ifname == name)
            .map(|r| r.attachment.clone())
    }

    /// Allocated addresses that no record holds (with its attachment as
    /// the file's owner).
    pub fn orphan_allocations(&self) -> Vec<IpAddr> {
        let st = self.state();
        st.allocations
            .iter()
            .filter(|(ip, owner)| {
                !owner
                    .as_ref()
                    .and_then(|o| st.records.get(o))
                    .is_some_and(|r| r.owns(ip))
            })
            .map(|(ip, _)| *ip)
            .collect()
    }

    /// Writes `record` atomically (replacing the attachment's record),
    /// whole but not durably: after an operating system crash the previous
    /// record may be back (see the module's notes).
    pub fn put(&self, record: &Record) -> Result<(), StoreError> {
        let mut st = self.state();
        let name = naming::record_file_name(&record.attachment);
        let path = self.root.join(ENDPOINTS_DIR).join(&name);
        if let Some(held) = st
            .records
            .keys()
            .find(|a| **a != record.attachment && naming::record_file_name(a) == name)
        {
            return Err(StoreError::NameClash {
                path,
                held: held.clone(),
                wanted: record.attachment.clone(),
            });
        }
        files::replace(&path, &record.encode(), 0o644, files::Durability::Whole)
            .map_err(io_error("write", &path))?;
        st.records.insert(record.attachment.clone(), record.clone());
        Ok(())
    }

    /// Deletes the attachment's record durably; none is success. Release
    /// its addresses after this, not before (see the module's notes).
    pub fn remove(&self, a: &Attachment) -> Result<(), StoreError> {
        let mut st = self.state();
        if st.records.contains_key(a) {
            let path = self
                .root
                .join(ENDPOINTS_DIR)
                .join(naming::record_file_name(a));
            files::remove_durably(&path).map_err(io_error("remove", &path))?;
            st.records.remove(a);
        }
        Ok(())
    }

    /// Allocates one address of each family `blocks` has for `owner`, as
    /// /32 and /128, durably (the files, then their directory, synced).
    /// All or nothing.
    pub fn allocate(&self, owner: &Attachment, blocks: &[IpNet]) -> Result<Vec<IpNet>, StoreError> {
        let mut st = self.state();
        let content = serde_json::to_vec(owner).unwrap_or_default();
        let mut taken: Vec<IpAddr> = Vec::new();
        let result = (|| {
            for family in [Family::V4, Family::V6] {
                // More tries than addresses can be missing from the maps
                // only if the directory changes under us.
                for _ in 0..64 {
                    let allocated: BTreeSet<IpAddr> = st.allocations.keys().copied().collect();
                    let Some(ip) =
                        ipam::choose_family(blocks, family, &allocated, st.cursors.get(family))?
                    else {
                        break;
                    };
                    let path = self.ipam_path(ip);
                    match files::create_exclusive(&path, &content) {
                        Ok(()) => {
                            st.allocations.insert(ip, Some(owner.clone()));
                            st.cursors.set(ip);
                            taken.push(ip);
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                            tracing::warn!(address = %ip, "allocation file appeared behind our back; skipping it");
                            let holder = fs::read(&path)
                                .ok()
                                .and_then(|b| serde_json::from_slice(&b).ok());
                            st.allocations.insert(ip, holder);
                        }
                        Err(e) => return Err(io_error("create", &path)(e)),
                    }
                }
            }
            // One directory sync for every file made above.
            if !taken.is_empty() {
                let dir = self.root.join(IPAM_DIR);
                files::sync_dir(&dir).map_err(io_error("sync", &dir))?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for ip in taken {
                let path = self.ipam_path(ip);
                if let Err(undo) = files::remove_durably(&path) {
                    tracing::warn!(file = %path.display(), error = %undo, "cannot undo a partial allocation");
                } else {
                    st.allocations.remove(&ip);
                }
            }
            return Err(e);
        }
        self.save_cursors(&st.cursors);
        Ok(taken.into_iter().map(IpNet::from).collect())
    }

    /// Releases every address whose file names `owner`; returns them. Not
    /// durable: a release lost in a crash leaves an orphan, released at
    /// start.
    pub fn release_owned_by(&self, owner: &Attachment) -> Result<Vec<IpAddr>, StoreError> {
        let mut st = self.state();
        let ips: Vec<IpAddr> = st
            .allocations
            .iter()
            .filter(|(_, o)| o.as_ref() == Some(owner))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in &ips {
            self.remove_allocation(&mut st, *ip)?;
        }
        Ok(ips)
    }

    /// Releases `ip` whoever owns it (an orphan), not durably.
    pub fn release(&self, ip: IpAddr) -> Result<(), StoreError> {
        let mut st = self.state();
        self.remove_allocation(&mut st, ip)
    }

    fn remove_allocation(&self, st: &mut State, ip: IpAddr) -> Result<(), StoreError> {
        let path = self.ipam_path(ip);
        files::remove(&path).map_err(io_error("remove", &path))?;
        st.allocations.remove(&ip);
        Ok(())
    }

    fn ipam_path(&self, ip: IpAddr) -> PathBuf {
        self.root.join(IPAM_DIR).join(ip.to_string())
    }

    /// Best effort and never synced: a lost cursor only restarts the round
    /// robin (an unreadable file reads as none).
    fn save_cursors(&self, cursors: &Cursors) {
        let path = self.root.join(CURSORS_FILE);
        let content = serde_json::to_vec(cursors).unwrap_or_default();
        if let Err(e) = files::replace(&path, &content, 0o644, files::Durability::Hint) {
            tracing::warn!(file = %path.display(), error = %e, "cannot save the allocation cursors");
        }
    }
}

fn read_cursors(path: &Path) -> Cursors {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The files of `dir` as (name, path), removing temporary files a crash
/// left behind.
fn list(dir: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("read", dir))? {
        let entry = entry.map_err(io_error("read", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if files::is_tmp(&name) {
            tracing::info!(file = %path.display(), "removing a temporary file left by a crash");
            let _ = fs::remove_file(&path);
            continue;
        }
        out.push((name, path));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::endpoint::record::RECORD_VERSION;

    fn att(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    fn record(a: &Attachment, addresses: Vec<IpNet>) -> Record {
        Record {
            version: RECORD_VERSION,
            phase: Phase::Ready,
            attachment: a.clone(),
            netns: "/run/netns/x".into(),
            pod: None,
            host_ifname: naming::host_ifname(a),
            addresses,
            mtu: 1450,
            host_mac: None,
            mac: None,
        }
    }

    fn blocks() -> Vec<IpNet> {
        vec![
            "10.244.1.0/29".parse().unwrap(),
            "fd00::/126".parse().unwrap(),
        ]
    }

    #[test]
    fn allocations_survive_a_restart_and_are_never_given_twice() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let store = Store::open(dir.path()).unwrap();
            let a = store.allocate(&att("a"), &blocks()).unwrap();
            assert_eq!(
                a,
                vec![
                    "10.244.1.1/32".parse::<IpNet>().unwrap(),
                    "fd00::1/128".parse().unwrap()
                ]
            );
            store.put(&record(&att("a"), a.clone())).unwrap();
            a
        };
        // The lock went with the store; a new one reads the files back.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.record(&att("a")).unwrap().addresses, first);
        let b = store.allocate(&att("b"), &blocks()).unwrap();
        assert_eq!(
            b,
            vec![
                "10.244.1.2/32".parse::<IpNet>().unwrap(),
                "fd00::2/128".parse().unwrap()
            ]
        );
        let owner: Attachment =
            serde_json::from_slice(&fs::read(dir.path().join("ipam/10.244.1.2")).unwrap()).unwrap();
        assert_eq!(owner, att("b"));
        // b has no record yet: its addresses are orphans.
        assert_eq!(
            store.orphan_allocations(),
            vec![
                "10.244.1.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_second_process_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _store = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("--state-dir"), "{err}");
    }

    #[test]
    fn release_is_round_robin_and_exhaustion_names_the_block() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let v4: Vec<IpNet> = vec!["10.244.1.0/30".parse().unwrap()];
        let one = store.allocate(&att("a"), &v4).unwrap();
        assert_eq!(store.release_owned_by(&att("a")).unwrap().len(), 1);
        let two = store.allocate(&att("b"), &v4).unwrap();
        assert_ne!(one, two, "the address just released is not reused at once");
        let three = store.allocate(&att("c"), &v4).unwrap();
        assert_eq!(three, one, "wrapped around");
        let err = store.allocate(&att("d"), &v4).unwrap_err();
        assert_eq!(err.to_string(), "no free IPv4 address in 10.244.1.0/30");
        // The cursor survives a restart.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        store.release_owned_by(&att("b")).unwrap();
        store.release_owned_by(&att("c")).unwrap();
        let next = store.allocate(&att("e"), &v4).unwrap();
        assert_eq!(
            next, two,
            "after the last one allocated (.1), .2 comes next"
        );
    }

    #[test]
    fn a_failed_family_leaves_no_allocation_of_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let blocks: Vec<IpNet> = vec![
            "10.244.1.0/29".parse().unwrap(),
            "fd00::/128".parse().unwrap(),
        ];
        let err = store.allocate(&att("a"), &blocks).unwrap_err();
        assert!(err.to_string().contains("fd00::/128"), "{err}");
        assert!(store.allocations().is_empty());
        assert_eq!(fs::read_dir(dir.path().join(IPAM_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn a_file_written_behind_our_back_is_skipped_not_shared() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(dir.path().join("ipam/10.244.1.1"), b"").unwrap();
        let got = store
            .allocate(&att("a"), &["10.244.1.0/29".parse().unwrap()])
            .unwrap();
        assert_eq!(got, vec!["10.244.1.2/32".parse::<IpNet>().unwrap()]);
        assert!(
            store
                .orphan_allocations()
                .contains(&"10.244.1.1".parse().unwrap())
        );
    }

    #[test]
    fn records_are_replaced_removed_and_clashing_names_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = Attachment {
            container_id: "a_b".into(),
            ifname: "c".into(),
        };
        let clash = Attachment {
            container_id: "a".into(),
            ifname: "b_c".into(),
        };
        let mut r = record(&a, vec![]);
        store.put(&r).unwrap();
        r.phase = Phase::Adding;
        store.put(&r).unwrap();
        assert_eq!(store.record(&a).unwrap().phase, Phase::Adding);
        assert_eq!(store.ready_count(), 0);
        let err = store.put(&record(&clash, vec![])).unwrap_err();
        assert!(matches!(err, StoreError::NameClash { .. }), "{err}");
        assert_eq!(
            store.owner_of_link(&naming::host_ifname(&a)),
            Some(a.clone())
        );
        store.remove(&a).unwrap();
        store.remove(&a).unwrap();
        assert!(store.records().is_empty());
        assert_eq!(
            fs::read_dir(dir.path().join(ENDPOINTS_DIR))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn a_corrupt_record_stops_the_start_and_temporary_files_go() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let tmp = dir.path().join("endpoints/.x_eth0.json.tmp");
        fs::write(&tmp, b"half").unwrap();
        drop(Store::open(dir.path()).unwrap());
        assert!(!tmp.exists());
        fs::write(dir.path().join("endpoints/x_eth0.json"), b"{").unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::BadRecord { .. }), "{err}");
    }
}
