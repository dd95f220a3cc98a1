//! Attaching both programs to a host veth, in the node's namespace.
//!
//! ```text
//!  caller ──▶ [ scoped OS thread: setns(CLONE_NEWNET) ─ ifname → ifindex ─ TCX link / clsact filter ] ──▶ caller
//! ```
//!
//! aya resolves interface names, creates TCX links and talks netlink in the
//! calling thread's network namespace, so all of it runs on a thread that
//! entered the node's namespace first (as [`crate::netns`] does for
//! rtnetlink).
//!
//! TCX (Linux ≥ 6.6): a TCX link stays attached only while something holds
//! it. A pinned load pins each link at `<pins>/links/<ifname>_from_pod` and
//! `…_to_pod`, so programs stay attached while trellis-node restarts. A
//! later attach (a restart, an upgrade) swaps the program in through the
//! pinned link with one `BPF_LINK_UPDATE`: no moment without policy. When
//! the device was deleted the pinned link is dead (the update fails with
//! ENOLINK): it is unpinned and the programs attached afresh. A pin
//! directory belongs to one node namespace; interface names are unique
//! there.
//!
//! clsact (the default, [`AttachMode::Auto`]): one `cls_bpf` filter per
//! hook at a fixed priority and handle, replaced in place on re-attach. A
//! filter outlives the process by itself, so nothing needs pinning; an
//! unpinned load removes its filters when dropped.
//!
//! Why clsact first although TCX is newer: creating a TCX link waits for an
//! RCU grace period while holding the RTNL lock (`tcx_entry_sync`), 7–16 ms
//! per program on our test VM, so 15–30 ms on every CNI ADD during which
//! no other netlink change on the node can proceed; a `cls_bpf` filter takes
//! about 0.15 ms (design 0004, "Hooks"). An interface already on TCX (an
//! earlier version attached it there) stays on TCX.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle};
use aya::programs::{Link as _, LinkOrder, ProgramError, SchedClassifier};
use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};

use super::datapath::{Datapath, Program, classifier, classifier_mut};
use super::error::{BpfError, io_errno, link_errno, program_errno, tc_errno};
use crate::netns::NetnsError;

/// Priority of our clsact filters: first, before any other filter.
pub const CLSACT_PRIORITY: u16 = 1;
/// Handle of our clsact filters (one per hook, so one is enough).
pub const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 1);

/// How to hook the programs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// clsact, unless the interface is on TCX already (links held or
    /// pinned for it, e.g. by an earlier version): then TCX, so a re-attach
    /// stays one atomic swap and the programs never run twice.
    Auto,
    Tcx,
    Clsact,
}

/// The hook the programs ended up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Tcx,
    Clsact,
}

/// What attaching one program did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkChange {
    /// Nothing of ours was on the hook.
    Created,
    /// Our link or filter was there: its program was swapped atomically.
    Replaced,
    /// A pinned link was dead (its device deleted) or elsewhere: it was
    /// unpinned and a new one attached.
    Renewed,
}

/// The outcome of [`Datapath::attach`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attachment {
    pub hook: Hook,
    pub from_pod: LinkChange,
    pub to_pod: LinkChange,
}

impl Attachment {
    fn of(hook: Hook, changes: [LinkChange; 2]) -> Attachment {
        Attachment {
            hook,
            from_pod: changes[Program::FromPod.index()],
            to_pod: changes[Program::ToPod.index()],
        }
    }
}

/// What a [`Datapath`] keeps attached on one interface for as long as it
/// lives (a pinned load keeps nothing: the pins and filters do).
#[derive(Debug, Default)]
pub(super) struct Held {
    /// TCX links of an unpinned load, by [`Program::index`]; dropping one
    /// detaches it.
    tcx: [Option<FdLink>; 2],
    /// Whether an unpinned load put clsact filters there.
    clsact: bool,
}

impl Datapath {
    /// Attaches both programs to `ifname`, the host side of a pod's veth,
    /// in the namespace at `netns` (`None`: the calling thread's), on the
    /// hook [`AttachMode::Auto`] picks. Idempotent: attaching again swaps in
    /// this value's programs without a gap.
    pub fn attach(&mut self, netns: Option<&Path>, ifname: &str) -> Result<Attachment, BpfError> {
        self.attach_with(netns, ifname, AttachMode::Auto)
    }

    /// [`attach`](Self::attach) with the hook chosen by the caller.
    pub fn attach_with(
        &mut self,
        netns: Option<&Path>,
        ifname: &str,
        mode: AttachMode,
    ) -> Result<Attachment, BpfError> {
        if self.pins.is_some() && ifname.contains('.') {
            return Err(BpfError::InterfaceName(ifname.to_owned()));
        }
        let links_dir = self.pins.as_ref().map(|p| p.join("links"));
        let key = (netns.map(Path::to_path_buf), ifname.to_owned());
        let hook = match mode {
            AttachMode::Tcx => Hook::Tcx,
            AttachMode::Clsact => Hook::Clsact,
            AttachMode::Auto if self.on_tcx(&key, links_dir.as_deref()) => Hook::Tcx,
            AttachMode::Auto => Hook::Clsact,
        };
        let namespace = namespace_name(netns);
        // An unpinned load's own links are the ones to swap through (TCX
        // refuses the same program twice on a hook).
        let mut held = self.held.remove(&key).unwrap_or_default();
        let mut existing = std::mem::take(&mut held.tcx);
        let ebpf = &mut self.ebpf;
        let attached = in_netns(netns, ifname, || {
            let mut changes = [LinkChange::Created; 2];
            let mut links: [Option<FdLink>; 2] = [None, None];
            if hook == Hook::Clsact {
                add_clsact(ifname, &namespace)?;
            }
            for program in Program::ALL {
                let prog = classifier_mut(ebpf, program)?;
                let on = On {
                    program,
                    ifname,
                    namespace: &namespace,
                };
                let i = program.index();
                changes[i] = match hook {
                    Hook::Tcx => {
                        let (change, link) =
                            attach_tcx(prog, &on, links_dir.as_deref(), existing[i].take())?;
                        links[i] = link;
                        change
                    }
                    Hook::Clsact => attach_clsact(prog, &on)?,
                };
            }
            Ok::<_, BpfError>((changes, links))
        })
        .and_then(|r| r);

        if self.pins.is_some() {
            return attached.map(|(changes, _)| Attachment::of(hook, changes));
        }
        // An unpinned load holds its links: the new ones or, after an
        // error, those not swapped yet (the others went with the error;
        // nothing of an unpinned load outlives it anyway).
        let result = match attached {
            Ok((changes, links)) => {
                match hook {
                    Hook::Tcx => held.tcx = links,
                    Hook::Clsact => held.clsact = true,
                }
                Ok(Attachment::of(hook, changes))
            }
            Err(e) => {
                held.tcx = existing;
                Err(e)
            }
        };
        self.held.insert(key, held);
        result
    }

    /// Whether `key`'s interface is on TCX already: links this value holds,
    /// or links pinned for it (by an earlier run or version).
    fn on_tcx(&self, key: &(Option<PathBuf>, String), links_dir: Option<&Path>) -> bool {
        let held = self
            .held
            .get(key)
            .is_some_and(|h| h.tcx.iter().any(Option::is_some));
        held || links_dir.is_some_and(|dir| {
            Program::ALL
                .into_iter()
                .any(|program| link_pin(dir, &key.1, program).exists())
        })
    }

    /// Detaches both programs from `ifname` in `netns`, whichever hook they
    /// are on; what is already gone (the device too) is fine. Keeps going
    /// after a failure and reports the first.
    pub fn detach(&mut self, netns: Option<&Path>, ifname: &str) -> Result<(), BpfError> {
        let mut first = None;
        let held = self
            .held
            .remove(&(netns.map(Path::to_path_buf), ifname.to_owned()));
        // Unpinned TCX links detach as they drop.
        drop(held);
        if let Some(pins) = &self.pins {
            for program in Program::ALL {
                let path = link_pin(&pins.join("links"), ifname, program);
                if let Err(e) = unpin(&path) {
                    first.get_or_insert(e);
                }
            }
        }
        if let Err(e) = detach_clsact(netns, ifname) {
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }

    /// Whether this value's programs are on `ifname`'s TCX hooks in
    /// `netns`: `[from_pod on ingress, to_pod on egress]`.
    pub fn tcx_attached(&self, netns: Option<&Path>, ifname: &str) -> Result<[bool; 2], BpfError> {
        let namespace = namespace_name(netns);
        let ebpf = &self.ebpf;
        in_netns(netns, ifname, || {
            let mut out = [false; 2];
            for (i, program) in Program::ALL.into_iter().enumerate() {
                out[i] = attached_here(
                    classifier(ebpf, program)?,
                    &On {
                        program,
                        ifname,
                        namespace: &namespace,
                    },
                )?;
            }
            Ok(out)
        })?
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        // Filters are removed by netlink in their own namespace; a TCX link
        // goes with its descriptor.
        for ((netns, ifname), held) in self.held.drain() {
            if held.clsact
                && let Err(e) = detach_clsact(netns.as_deref(), &ifname)
            {
                tracing::warn!(%ifname, error = %e, "cannot remove the policy filters");
            }
        }
    }
}

/// A program and where it goes, for messages.
struct On<'a> {
    program: Program,
    ifname: &'a str,
    namespace: &'a str,
}

impl On<'_> {
    fn attach_failed(&self) -> impl FnOnce(ProgramError) -> BpfError + '_ {
        move |e| BpfError::Attach {
            program: self.program.name(),
            ifname: self.ifname.to_owned(),
            hook: self.program.hook_name(),
            namespace: self.namespace.to_owned(),
            errno: program_errno(&e),
            source: Box::new(e),
        }
    }
}

fn namespace_name(netns: Option<&Path>) -> String {
    netns.map_or_else(
        || "the current namespace".to_owned(),
        |p| p.display().to_string(),
    )
}

fn link_pin(links_dir: &Path, ifname: &str, program: Program) -> PathBuf {
    links_dir.join(format!("{ifname}_{}", program.pin_suffix()))
}

/// Runs `f` on a thread inside the namespace at `netns`, or right here.
fn in_netns<T: Send>(
    netns: Option<&Path>,
    ifname: &str,
    f: impl FnOnce() -> T + Send,
) -> Result<T, BpfError> {
    let Some(path) = netns else {
        return Ok(f());
    };
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("trellis-bpf-netns".into())
            .spawn_scoped(scope, || {
                // Only this thread moves; it ends with the job.
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok(f())
            })
            .map_err(NetnsError::Thread)?;
        thread.join().map_err(|_| BpfError::Thread {
            ifname: ifname.to_owned(),
        })?
    })
}

fn add_clsact(ifname: &str, namespace: &str) -> Result<(), BpfError> {
    match tc::qdisc_add_clsact(ifname) {
        Ok(()) => Ok(()),
        Err(e) if tc_errno(&e) == Some(Errno::EEXIST) => Ok(()),
        Err(e) => Err(BpfError::Clsact {
            ifname: ifname.to_owned(),
            namespace: namespace.to_owned(),
            errno: tc_errno(&e),
            source: Box::new(e),
        }),
    }
}

/// A fresh TCX link, last on the hook.
fn new_tcx_link(prog: &mut SchedClassifier, on: &On<'_>) -> Result<FdLink, BpfError> {
    let id = prog
        .attach_with_options(
            on.ifname,
            on.program.hook(),
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(on.attach_failed())?;
    let link = prog.take_link(id).map_err(on.attach_failed())?;
    FdLink::try_from(link).map_err(|source| BpfError::Link {
        context: format!("the TCX link of {} on {}", on.program.name(), on.ifname),
        errno: link_errno(&source),
        source: Box::new(source),
    })
}

fn pin_link(link: FdLink, path: &Path, on: &On<'_>) -> Result<(), BpfError> {
    // The pinned link's descriptor closes here; the pin holds the link.
    link.pin(path)
        .map(drop)
        .map_err(|source| BpfError::PinLink {
            program: on.program.name(),
            ifname: on.ifname.to_owned(),
            path: path.to_path_buf(),
            source: Box::new(source),
        })
}

fn unpin(path: &Path) -> Result<(), BpfError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BpfError::Unpin {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Attaches through TCX. An unpinned load swaps its program in through the
/// link it holds (`held`), a pinned one through the pinned link; either
/// way, a new link when there is none, or it is dead or elsewhere. Returns
/// the link to hold (unpinned loads only).
fn attach_tcx(
    prog: &mut SchedClassifier,
    on: &On<'_>,
    links_dir: Option<&Path>,
    held: Option<FdLink>,
) -> Result<(LinkChange, Option<FdLink>), BpfError> {
    let Some(links_dir) = links_dir else {
        let Some(link) = held else {
            return Ok((LinkChange::Created, Some(new_tcx_link(prog, on)?)));
        };
        return Ok(match replace_through(prog, on, link, "the held link")? {
            Some(link) => (LinkChange::Replaced, Some(link)),
            None => (LinkChange::Renewed, Some(new_tcx_link(prog, on)?)),
        });
    };
    let path = link_pin(links_dir, on.ifname, on.program);
    let pinned = match PinnedLink::from_pin(&path) {
        Ok(pinned) => pinned,
        Err(e) if link_errno(&e) == Some(Errno::ENOENT) => {
            pin_link(new_tcx_link(prog, on)?, &path, on)?;
            return Ok((LinkChange::Created, None));
        }
        Err(source) => {
            return Err(BpfError::Link {
                context: format!("open the pinned link {}", path.display()),
                errno: link_errno(&source),
                source: Box::new(source),
            });
        }
    };
    let what = format!("the pinned link {}", path.display());
    // The pin holds a live link; our descriptor can go.
    if replace_through(prog, on, FdLink::from(pinned), &what)?.is_some() {
        return Ok((LinkChange::Replaced, None));
    }
    unpin(&path)?;
    pin_link(new_tcx_link(prog, on)?, &path, on)?;
    Ok((LinkChange::Renewed, None))
}

/// Swaps `prog` in through `link` with one `BPF_LINK_UPDATE` (no moment
/// without a program). The link back when it is live on this interface's
/// hook; `None` when it is dead (its device was deleted: ENOLINK), not a
/// TCX link, or attached elsewhere.
fn replace_through(
    prog: &mut SchedClassifier,
    on: &On<'_>,
    link: FdLink,
    what: &str,
) -> Result<Option<FdLink>, BpfError> {
    let link = match SchedClassifierLink::try_from(link) {
        Ok(link) => link,
        Err(LinkError::InvalidLink) => return Ok(None),
        Err(source) => {
            return Err(BpfError::Link {
                context: format!("inspect {what}"),
                errno: link_errno(&source),
                source: Box::new(source),
            });
        }
    };
    let id = match prog.attach_to_link(link) {
        Ok(id) => id,
        Err(e) if program_errno(&e) == Some(Errno::ENOLINK) => return Ok(None),
        Err(e) => return Err(on.attach_failed()(e)),
    };
    let link = prog.take_link(id).map_err(on.attach_failed())?;
    let link = FdLink::try_from(link).map_err(|source| BpfError::Link {
        context: format!("{what} of {} on {}", on.program.name(), on.ifname),
        errno: link_errno(&source),
        source: Box::new(source),
    })?;
    Ok(attached_here(prog, on)?.then_some(link))
}

/// Whether `prog` is among the TCX programs on the interface's hook.
fn attached_here(prog: &SchedClassifier, on: &On<'_>) -> Result<bool, BpfError> {
    let ours = prog.info().map_err(on.attach_failed())?.id();
    let (_, programs) =
        SchedClassifier::query_tcx(on.ifname, on.program.hook()).map_err(on.attach_failed())?;
    Ok(programs.iter().any(|p| p.id() == ours))
}

/// Attaches through clsact: replaces our filter in place, or adds it.
fn attach_clsact(prog: &mut SchedClassifier, on: &On<'_>) -> Result<LinkChange, BpfError> {
    let ours = SchedClassifierLink::attached(
        on.ifname,
        on.program.hook(),
        CLSACT_PRIORITY,
        CLSACT_HANDLE,
        None,
    )
    .map_err(|e| on.attach_failed()(ProgramError::IOError(e)))?;
    let (id, change) = match prog.attach_to_link(ours) {
        Ok(id) => (id, LinkChange::Replaced),
        // No filter of ours there yet.
        Err(e) if program_errno(&e) == Some(Errno::ENOENT) => {
            let id = prog
                .attach_with_options(
                    on.ifname,
                    on.program.hook(),
                    TcAttachOptions::Netlink(NlOptions {
                        priority: CLSACT_PRIORITY,
                        handle: CLSACT_HANDLE,
                        classid: None,
                    }),
                )
                .map_err(on.attach_failed())?;
            (id, LinkChange::Created)
        }
        Err(e) => return Err(on.attach_failed()(e)),
    };
    // Dropping the link would delete the filter (from whatever namespace
    // the dropping thread is in): it is identified by (priority, handle)
    // instead, and removed explicitly by detach.
    std::mem::forget(prog.take_link(id).map_err(on.attach_failed())?);
    Ok(change)
}

/// Removes our clsact filters from `ifname`, if any.
fn detach_clsact(netns: Option<&Path>, ifname: &str) -> Result<(), BpfError> {
    let namespace = namespace_name(netns);
    let result = in_netns(netns, ifname, || {
        for program in Program::ALL {
            let failed = |e: TcError| BpfError::Detach {
                program: program.name(),
                ifname: ifname.to_owned(),
                namespace: namespace.clone(),
                errno: tc_errno(&e),
                source: Box::new(e),
            };
            let link = match SchedClassifierLink::attached(
                ifname,
                program.hook(),
                CLSACT_PRIORITY,
                CLSACT_HANDLE,
                None,
            ) {
                Ok(link) => link,
                // The device is gone, and its filters with it.
                Err(e) if io_errno(&e) == Some(Errno::ENODEV) => return Ok(()),
                Err(e) => return Err(failed(TcError::IoError(e))),
            };
            match link.detach() {
                Ok(()) => {}
                // ENOENT: no such filter; EINVAL: no clsact qdisc at all
                // (the kernel's "Cannot find specified qdisc").
                Err(ProgramError::NetlinkError(e))
                    if matches!(
                        e.raw_os_error().map(Errno::from_raw),
                        Some(Errno::ENOENT | Errno::EINVAL | Errno::ENODEV)
                    ) => {}
                Err(ProgramError::NetlinkError(e)) => return Err(failed(TcError::NetlinkError(e))),
                Err(e) => {
                    return Err(failed(TcError::IoError(std::io::Error::other(
                        e.to_string(),
                    ))));
                }
            }
        }
        Ok(())
    });
    match result {
        Ok(r) => r,
        // The namespace is gone, and the device with it.
        Err(BpfError::Netns(e))
            if matches!(&*e, NetnsError::Open { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}
