//! Detached control-plane processes and their pid files.
//!
//! A process is started in its own process group with stdin closed and its output in a log
//! file, so it outlives the `trellis-sandbox up` that started it and a Ctrl-C in that terminal
//! does not reach it. Its pid, binary and kernel start time are written to a pid file right
//! after the spawn; whoever ends it later (`down`, the next `up`, a test's `Drop`) signals that
//! pid only, and only while `/proc/<pid>` still shows the recorded program started at the
//! recorded time, so a pid the kernel has since handed to someone else is never signalled.

use std::{
    fmt,
    fs::File,
    io::{Read, Seek, SeekFrom},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::error::{Error, Result};

/// How often we look at a process we are waiting on.
const POLL: Duration = Duration::from_millis(50);
/// How long a process gets after SIGKILL before we give up on it.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Lines of log quoted in errors.
pub const LOG_TAIL_LINES: usize = 30;

/// What a pid file records about one process we started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidRecord {
    /// Our name for it (`etcd`, `kube-apiserver`); also the pid file's stem.
    pub name: String,
    pub pid: u32,
    /// Canonical path of the binary we executed.
    pub binary: PathBuf,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks after boot) when we recorded it.
    pub starttime: Option<u64>,
}

impl PidRecord {
    /// The pid file's text: `key=value` lines.
    pub fn render(&self) -> String {
        let mut s = format!("pid={}\nbinary={}\n", self.pid, self.binary.display());
        if let Some(t) = self.starttime {
            s.push_str(&format!("starttime={t}\n"));
        }
        s
    }

    /// Parse [`PidRecord::render`]'s output; unknown keys are ignored.
    pub fn parse(name: &str, text: &str) -> std::result::Result<Self, String> {
        let (mut pid, mut binary, mut starttime) = (None, None, None);
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("line {line:?} is not key=value"))?;
            match key {
                "pid" => {
                    let p: u32 = value.parse().map_err(|e| format!("pid {value:?}: {e}"))?;
                    if p == 0 || i32::try_from(p).is_err() {
                        return Err(format!("pid {p} is out of range"));
                    }
                    pid = Some(p);
                }
                "binary" => binary = Some(PathBuf::from(value)),
                "starttime" => {
                    starttime = Some(
                        value
                            .parse()
                            .map_err(|e| format!("starttime {value:?}: {e}"))?,
                    )
                }
                _ => {}
            }
        }
        Ok(PidRecord {
            name: name.to_string(),
            pid: pid.ok_or("no pid= line")?,
            binary: binary.ok_or("no binary= line")?,
            starttime,
        })
    }

    /// Read the pid file at `path`; the record's name is the file stem.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        PidRecord::parse(&name, &text).map_err(|reason| Error::PidFile {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Write the pid file atomically (a crash never leaves half a record).
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("pid.tmp");
        std::fs::write(&tmp, self.render()).map_err(|e| Error::io("write", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))
    }
}

/// What `/proc` says about a live (non-zombie) pid.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcIdentity {
    /// Target of `/proc/<pid>/exe`, without the ` (deleted)` suffix the kernel adds when the
    /// file was replaced (as `build.sh` does when it rebuilds a tool).
    pub exe: Option<PathBuf>,
    /// First element of `/proc/<pid>/cmdline`.
    pub argv0: Option<PathBuf>,
    pub starttime: Option<u64>,
}

/// The state letter and start time from the text of `/proc/<pid>/stat`.
pub fn parse_stat(stat: &str) -> Option<(char, u64)> {
    // The command name in parentheses may itself contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `state` is field 3 of the file, `starttime` field 22.
    let starttime = fields.nth(18)?.parse().ok()?;
    Some((state, starttime))
}

/// Identity of `pid` if it is running; `None` if it is gone or a zombie.
pub fn proc_identity(pid: u32) -> Option<ProcIdentity> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(proc.join("stat")).ok()?;
    let (state, starttime) = parse_stat(&stat)?;
    if matches!(state, 'Z' | 'X' | 'x') {
        return None;
    }
    let exe = std::fs::read_link(proc.join("exe")).ok().map(|p| {
        let s = p.to_string_lossy();
        match s.strip_suffix(" (deleted)") {
            Some(stripped) => PathBuf::from(stripped),
            None => p,
        }
    });
    let argv0 = std::fs::read(proc.join("cmdline")).ok().and_then(|c| {
        let first = c.split(|b| *b == 0).next()?;
        (!first.is_empty()).then(|| PathBuf::from(String::from_utf8_lossy(first).into_owned()))
    });
    Some(ProcIdentity {
        exe,
        argv0,
        starttime: Some(starttime),
    })
}

/// Whether a running process is the one `record` describes: same start time (when both are
/// known) and running the recorded binary.
pub fn identity_matches(record: &PidRecord, seen: &ProcIdentity) -> bool {
    if let (Some(want), Some(got)) = (record.starttime, seen.starttime)
        && want != got
    {
        return false;
    }
    seen.exe.as_deref() == Some(record.binary.as_path())
        || seen.argv0.as_deref() == Some(record.binary.as_path())
}

/// Whether `pid` is running (a zombie counts as gone).
pub fn is_alive(pid: u32) -> bool {
    proc_identity(pid).is_some()
}

/// How a recorded process was dealt with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It exited after SIGTERM.
    Terminated,
    /// It ignored SIGTERM for the grace period and was killed.
    Killed,
    /// It was not running any more.
    AlreadyGone,
    /// The pid is alive but runs something else now; it was left alone.
    PidReused,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Terminated => "terminated",
            Outcome::Killed => "killed after the grace period",
            Outcome::AlreadyGone => "already gone",
            Outcome::PidReused => "pid now belongs to another program, left alone",
        })
    }
}

/// A recorded process and what ending it did.
#[derive(Debug, Clone)]
pub struct Ended {
    pub record: PidRecord,
    pub outcome: Outcome,
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (pid {}): {}",
            self.record.name, self.record.pid, self.outcome
        )
    }
}

/// End the process `record` describes: SIGTERM, up to `grace` for it to exit, then SIGKILL.
/// With `child` (we started it in this process) liveness comes from `waitpid`, which also reaps
/// it and proves the pid was not reused; otherwise from `/proc`, and only a pid whose identity
/// still matches the record is signalled.
pub fn end(record: &PidRecord, mut child: Option<&mut Child>, grace: Duration) -> Result<Outcome> {
    if child.is_none() {
        match proc_identity(record.pid) {
            None => return Ok(Outcome::AlreadyGone),
            Some(seen) if !identity_matches(record, &seen) => return Ok(Outcome::PidReused),
            Some(_) => {}
        }
    } else if !still_running(record.pid, child.as_deref_mut()) {
        return Ok(Outcome::AlreadyGone);
    }

    let terminate_err = |reason: String| Error::Terminate {
        name: record.name.clone(),
        pid: record.pid,
        reason,
    };
    let pid = Pid::from_raw(
        i32::try_from(record.pid).map_err(|_| terminate_err("pid out of range".into()))?,
    );
    let signal = |sig: Signal| match kill(pid, sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(terminate_err(format!("{sig}: {e}"))),
    };

    signal(Signal::SIGTERM)?;
    if wait_until_gone(record.pid, &mut child, grace) {
        return Ok(Outcome::Terminated);
    }
    signal(Signal::SIGKILL)?;
    if wait_until_gone(record.pid, &mut child, KILL_GRACE) {
        return Ok(Outcome::Killed);
    }
    Err(terminate_err(format!(
        "still running {KILL_GRACE:?} after SIGKILL"
    )))
}

/// SIGKILL the process `record` describes, without a SIGTERM first (a crash, for tests), and
/// wait until it is gone. Only a pid whose identity still matches the record is signalled.
pub fn sigkill(record: &PidRecord) -> Result<Outcome> {
    match proc_identity(record.pid) {
        None => return Ok(Outcome::AlreadyGone),
        Some(seen) if !identity_matches(record, &seen) => return Ok(Outcome::PidReused),
        Some(_) => {}
    }
    let kill_err = |reason: String| Error::Terminate {
        name: record.name.clone(),
        pid: record.pid,
        reason,
    };
    let pid =
        Pid::from_raw(i32::try_from(record.pid).map_err(|_| kill_err("pid out of range".into()))?);
    match kill(pid, Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => return Err(kill_err(format!("SIGKILL: {e}"))),
    }
    if wait_until_gone(record.pid, &mut None, KILL_GRACE) {
        Ok(Outcome::Killed)
    } else {
        Err(kill_err(format!(
            "still running {KILL_GRACE:?} after SIGKILL"
        )))
    }
}

/// Collect the exit status of `pid` if it is an exited child of this program: a detached
/// process started here whose `Child` handle was dropped (the node agents), ended by its
/// record, would otherwise stay a zombie until this program exits. Anything else is left
/// alone. Never call it for a process whose `Child` someone still holds: its `wait` would
/// then fail.
pub fn reap(pid: u32) {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    if let Ok(pid) = i32::try_from(pid) {
        let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    }
}

fn still_running(pid: u32, child: Option<&mut Child>) -> bool {
    match child.map(Child::try_wait) {
        Some(Ok(None)) => true,
        Some(Ok(Some(_))) => false,
        // Not our child after all (or already reaped elsewhere): ask /proc.
        Some(Err(_)) | None => is_alive(pid),
    }
}

fn wait_until_gone(pid: u32, child: &mut Option<&mut Child>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !still_running(pid, child.as_deref_mut()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// A process this program started, with its pid file.
#[derive(Debug)]
pub struct Process {
    pub record: PidRecord,
    pub log: PathBuf,
    pub pid_file: PathBuf,
    child: Child,
}

impl Process {
    /// Start `binary` with `args`, detached into its own process group, stdin closed and
    /// stdout+stderr appended to `log`; record it in `pid_file` at once.
    pub fn spawn(
        name: &str,
        binary: &Path,
        args: &[String],
        log: &Path,
        pid_file: &Path,
    ) -> Result<Self> {
        Process::spawn_with_env(name, binary, args, &[], log, pid_file)
    }

    /// [`Process::spawn`] with changes to the inherited environment: `(key, Some(value))` sets
    /// a variable, `(key, None)` removes it.
    pub fn spawn_with_env(
        name: &str,
        binary: &Path,
        args: &[String],
        env: &[(&str, Option<&str>)],
        log: &Path,
        pid_file: &Path,
    ) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::io("open log", log, e))?;
        let err = out.try_clone().map_err(|e| Error::io("open log", log, e))?;
        let mut command = Command::new(binary);
        for (key, value) in env {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        let mut child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|source| Error::Spawn {
                name: name.to_string(),
                binary: binary.to_path_buf(),
                source,
            })?;
        let pid = child.id();
        let record = PidRecord {
            name: name.to_string(),
            pid,
            binary: binary.to_path_buf(),
            starttime: proc_identity(pid).and_then(|i| i.starttime),
        };
        if let Err(e) = record.write(pid_file) {
            // Without a pid file nobody could end it later: do it now.
            let _ = end(&record, Some(&mut child), Duration::from_secs(5));
            return Err(e);
        }
        Ok(Process {
            record,
            log: log.to_path_buf(),
            pid_file: pid_file.to_path_buf(),
            child,
        })
    }

    pub fn name(&self) -> &str {
        &self.record.name
    }

    pub fn pid(&self) -> u32 {
        self.record.pid
    }

    /// `Some(exit status)` once the process has exited.
    pub fn exit_status(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => (!is_alive(self.record.pid)).then(|| format!("unknown status ({e})")),
        }
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, LOG_TAIL_LINES)
    }

    /// End it (see [`end`]) and remove its pid file.
    pub fn end(&mut self, grace: Duration) -> Result<Outcome> {
        let outcome = end(&self.record, Some(&mut self.child), grace)?;
        remove_pid_file(&self.pid_file)?;
        Ok(outcome)
    }

    /// Error for a process that exited while we waited for it.
    pub(crate) fn exited_error(&self, status: String) -> Error {
        Error::ProcessExited {
            name: self.record.name.clone(),
            pid: self.record.pid,
            status,
            log: self.log.clone(),
            tail: self.log_tail(),
        }
    }
}

pub(crate) fn remove_pid_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// The last `lines` lines of the file at `path` (reading at most its last 64 KiB).
pub fn log_tail(path: &Path, lines: usize) -> String {
    const WINDOW: u64 = 64 * 1024;
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(WINDOW)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => tail_lines(&text, lines),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> PidRecord {
        PidRecord {
            name: "etcd".into(),
            pid: 4242,
            binary: "/cache/etcd-v3.5.21/etcd".into(),
            starttime: Some(987654),
        }
    }

    #[test]
    fn pid_record_round_trips() {
        let r = record();
        assert_eq!(PidRecord::parse("etcd", &r.render()).unwrap(), r);
        let no_start = PidRecord {
            starttime: None,
            ..r
        };
        assert_eq!(
            PidRecord::parse("etcd", &no_start.render()).unwrap(),
            no_start
        );
    }

    #[test]
    fn pid_record_rejects_garbage() {
        assert!(PidRecord::parse("x", "binary=/bin/x\n").is_err());
        assert!(PidRecord::parse("x", "pid=12\n").is_err());
        assert!(PidRecord::parse("x", "pid=0\nbinary=/bin/x\n").is_err());
        assert!(PidRecord::parse("x", "pid=-3\nbinary=/bin/x\n").is_err());
        assert!(PidRecord::parse("x", "pid=99999999999\nbinary=/bin/x\n").is_err());
        assert!(PidRecord::parse("x", "just a number\n").is_err());
    }

    #[test]
    fn parses_proc_stat_with_awkward_comm() {
        let stat = "4242 (kube (api) server) S 1 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 12 0 987654 1000 10";
        assert_eq!(parse_stat(stat), Some(('S', 987654)));
        assert_eq!(parse_stat("4242 (x) Z 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn identity_needs_binary_and_start_time() {
        let r = record();
        let same = ProcIdentity {
            exe: Some(r.binary.clone()),
            argv0: Some(r.binary.clone()),
            starttime: r.starttime,
        };
        assert!(identity_matches(&r, &same));
        // exe unreadable (other user), argv0 still tells.
        assert!(identity_matches(
            &r,
            &ProcIdentity {
                exe: None,
                ..same.clone()
            }
        ));
        // pid reused by another program.
        let other = ProcIdentity {
            exe: Some("/usr/bin/sleep".into()),
            argv0: Some("sleep".into()),
            starttime: r.starttime,
        };
        assert!(!identity_matches(&r, &other));
        // pid reused by a later run of the same binary.
        assert!(!identity_matches(
            &r,
            &ProcIdentity {
                starttime: Some(1),
                ..same.clone()
            }
        ));
        // Nothing readable: never a match.
        assert!(!identity_matches(&r, &ProcIdentity::default()));
    }

    #[test]
    fn reads_own_identity_from_proc() {
        let me = proc_identity(std::process::id()).unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(me.exe.as_deref(), Some(exe.as_path()));
        assert!(me.starttime.is_some());
        assert!(is_alive(std::process::id()));
    }

    #[test]
    fn ends_a_spawned_process_and_leaves_a_foreign_pid_alone() {
        let dir = tempfile::Builder::new()
            .prefix("trellis-proc-")
            .tempdir()
            .unwrap();
        let sleep = std::fs::canonicalize("/bin/sleep").unwrap();
        let log = dir.path().join("sleep.log");
        let pid_file = dir.path().join("sleep.pid");
        let mut p = Process::spawn("sleep", &sleep, &["600".into()], &log, &pid_file).unwrap();
        let on_disk = PidRecord::read(&pid_file).unwrap();
        assert_eq!(on_disk, p.record);
        assert!(identity_matches(&on_disk, &proc_identity(p.pid()).unwrap()));

        // A record claiming the same pid ran another binary must not be acted on.
        let foreign = PidRecord {
            binary: "/not/what/runs/there".into(),
            ..on_disk.clone()
        };
        assert_eq!(
            end(&foreign, None, Duration::from_secs(1)).unwrap(),
            Outcome::PidReused
        );
        assert!(p.exit_status().is_none(), "foreign record must not signal");

        assert_eq!(p.end(Duration::from_secs(10)).unwrap(), Outcome::Terminated);
        assert!(p.exit_status().is_some());
        assert!(!pid_file.exists());
        assert_eq!(
            end(&on_disk, None, Duration::from_secs(1)).unwrap(),
            Outcome::AlreadyGone
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
        assert_eq!(tail_lines("", 5), "");
    }
}
