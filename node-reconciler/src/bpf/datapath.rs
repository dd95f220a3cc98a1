//! Loading the policy object, and typed access to its maps.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray};
use aya::programs::{ProgramInfo, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, TestRun as _, TestRunOptions};
use ipnet::IpNet;
use nix::errno::Errno;
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use super::abi::{
    COUNTERS, CtEntry, CtKey, Direction, EndpointEntry, IpCacheEntry, IpCacheKey, PIN_VERSION,
    PolicyEntry, PolicyKey, Reason, decode_endpoint_key, encode_endpoint_key,
};
use super::attach::Held;
use super::error::{BpfError, map_errno, program_errno};

/// The compiled `bpf/endpoint.bpf.c` (see build.rs), its maps pinned by name.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/endpoint.bpf.o"));
/// The same code, its maps not pinned.
static OBJECT_UNPINNED: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/endpoint.bpf.unpinned.o"));

pub const MAP_ENDPOINTS: &str = "trellis_endpoints";
pub const MAP_IPCACHE: &str = "trellis_ipcache";
pub const MAP_POLICY: &str = "trellis_policy";
pub const MAP_CT: &str = "trellis_ct";
pub const MAP_FRAGS: &str = "trellis_frags";
pub const MAP_COUNTERS: &str = "trellis_counters";
/// Every map the object pins.
pub const MAPS: [&str; 6] = [
    MAP_ENDPOINTS,
    MAP_IPCACHE,
    MAP_POLICY,
    MAP_CT,
    MAP_FRAGS,
    MAP_COUNTERS,
];

/// One of the two programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Program {
    /// `trellis_from_pod`: the host veth's ingress, the pod's egress policy.
    FromPod,
    /// `trellis_to_pod`: the host veth's egress, the pod's ingress policy.
    ToPod,
}

impl Program {
    pub const ALL: [Program; 2] = [Program::FromPod, Program::ToPod];

    /// The function name in the object.
    pub const fn name(self) -> &'static str {
        match self {
            Program::FromPod => "trellis_from_pod",
            Program::ToPod => "trellis_to_pod",
        }
    }

    /// Its position in [`Program::ALL`].
    pub(super) const fn index(self) -> usize {
        match self {
            Program::FromPod => 0,
            Program::ToPod => 1,
        }
    }

    /// The pod's direction it enforces.
    pub const fn direction(self) -> Direction {
        match self {
            Program::FromPod => Direction::Egress,
            Program::ToPod => Direction::Ingress,
        }
    }

    /// The program enforcing the pod's `dir`.
    pub const fn for_direction(dir: Direction) -> Program {
        match dir {
            Direction::Egress => Program::FromPod,
            Direction::Ingress => Program::ToPod,
        }
    }

    /// The hook of the host veth it runs on.
    pub(super) const fn hook(self) -> TcAttachType {
        match self {
            Program::FromPod => TcAttachType::Ingress,
            Program::ToPod => TcAttachType::Egress,
        }
    }

    pub(super) const fn hook_name(self) -> &'static str {
        match self {
            Program::FromPod => "ingress",
            Program::ToPod => "egress",
        }
    }

    /// Suffix of its link pins: `<ifname>_from_pod`.
    pub(super) const fn pin_suffix(self) -> &'static str {
        match self {
            Program::FromPod => "from_pod",
            Program::ToPod => "to_pod",
        }
    }
}

/// What a program decided about a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `TC_ACT_OK` (`TCX_PASS`).
    Pass,
    /// `TC_ACT_SHOT` (`TCX_DROP`).
    Drop,
    /// Anything else: a bug in the program.
    Other(i32),
}

impl Verdict {
    fn from_retval(retval: u32) -> Verdict {
        match retval {
            0 => Verdict::Pass,
            2 => Verdict::Drop,
            r => Verdict::Other(r.cast_signed()),
        }
    }
}

/// The drop and pass counters, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters(HashMap<(Reason, Direction), u64>);

impl Counters {
    /// Packets counted under `reason` in `dir`.
    pub fn get(&self, reason: Reason, dir: Direction) -> u64 {
        self.0.get(&(reason, dir)).copied().unwrap_or_default()
    }

    /// The counters that are not zero, in reason order.
    pub fn nonzero(&self) -> Vec<(Reason, Direction, u64)> {
        let mut v: Vec<_> = self
            .0
            .iter()
            .filter(|(_, n)| **n != 0)
            .map(|(&(r, d), &n)| (r, d, n))
            .collect();
        v.sort();
        v
    }

    /// What changed from `before` to `self` (counters only grow).
    pub fn since(&self, before: &Counters) -> Counters {
        Counters(
            self.0
                .iter()
                .map(|(k, n)| {
                    (
                        *k,
                        n.wrapping_sub(before.0.get(k).copied().unwrap_or_default()),
                    )
                })
                .collect(),
        )
    }
}

/// The loaded policy programs and their maps.
///
/// Loaded with a pin directory, the maps live in `<dir>/v1/` (reused when
/// already there, so a restart keeps tables and connections) and attached
/// TCX links in `<dir>/v1/links/`. Without one, nothing outlives the value:
/// each load has maps of its own, for tests and benchmarks.
pub struct Datapath {
    pub(super) ebpf: Ebpf,
    endpoints: BpfHashMap<MapData, [u8; 4], [u8; EndpointEntry::SIZE]>,
    ipcache: LpmTrie<MapData, [u8; IpCacheKey::DATA_SIZE], [u8; IpCacheEntry::SIZE]>,
    policy: BpfHashMap<MapData, [u8; PolicyKey::SIZE], [u8; PolicyEntry::SIZE]>,
    ct: BpfHashMap<MapData, [u8; CtKey::SIZE], [u8; CtEntry::SIZE]>,
    counters: PerCpuArray<MapData, u64>,
    /// `<dir>/v1` of a pinned load.
    pub(super) pins: Option<PathBuf>,
    /// Links this value keeps attached (unpinned loads, clsact filters of
    /// unpinned loads), by (namespace, interface).
    pub(super) held: HashMap<(Option<PathBuf>, String), Held>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pins", &self.pins)
            .field("held", &self.held.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads and verifies both programs. With `pin_dir` (on a bpffs), the
    /// maps are pinned in `<pin_dir>/v1/`, or reused from there; without,
    /// they are private to this value.
    pub fn load(pin_dir: Option<&Path>) -> Result<Datapath, BpfError> {
        let pins = pin_dir.map(prepare_pin_dir).transpose()?;
        let object = if pins.is_some() {
            OBJECT
        } else {
            OBJECT_UNPINNED
        };
        Datapath::load_object(pins, object)
    }

    /// Loads another build of the same programs, unpinned: an object of
    /// build.rs's whose maps have no pinning attribute. The tests load
    /// `endpoint.bpf.helper-reads.o` with it, the build that reads every
    /// header through the helper (see `bpf/lib/parse.h`).
    #[doc(hidden)]
    pub fn load_unpinned_object(object: &[u8]) -> Result<Datapath, BpfError> {
        Datapath::load_object(None, object)
    }

    fn load_object(pins: Option<PathBuf>, object: &[u8]) -> Result<Datapath, BpfError> {
        let mut loader = EbpfLoader::new();
        if let Some(dir) = &pins {
            loader.default_map_pin_directory(dir);
        }
        let mut ebpf = loader.load(object).map_err(|e| BpfError::Load {
            pin_dir: pins.clone(),
            source: Box::new(e),
        })?;

        for program in Program::ALL {
            classifier_mut(&mut ebpf, program)?
                .load()
                .map_err(|e| BpfError::Verify {
                    program: program.name(),
                    source: Box::new(e),
                })?;
        }

        Ok(Datapath {
            endpoints: BpfHashMap::try_from(take_map(&mut ebpf, MAP_ENDPOINTS)?)
                .map_err(layout(MAP_ENDPOINTS))?,
            ipcache: LpmTrie::try_from(take_map(&mut ebpf, MAP_IPCACHE)?)
                .map_err(layout(MAP_IPCACHE))?,
            policy: BpfHashMap::try_from(take_map(&mut ebpf, MAP_POLICY)?)
                .map_err(layout(MAP_POLICY))?,
            ct: BpfHashMap::try_from(take_map(&mut ebpf, MAP_CT)?).map_err(layout(MAP_CT))?,
            counters: PerCpuArray::try_from(take_map(&mut ebpf, MAP_COUNTERS)?)
                .map_err(layout(MAP_COUNTERS))?,
            ebpf,
            pins,
            held: HashMap::new(),
        })
    }

    /// `<pin_dir>/v1` of a pinned load.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_deref()
    }

    /// What the kernel says about a loaded program (its id, size, how many
    /// instructions the verifier processed).
    pub fn program_info(&self, program: Program) -> Result<ProgramInfo, BpfError> {
        classifier(&self.ebpf, program)?
            .info()
            .map_err(|e| BpfError::Verify {
                program: program.name(),
                source: Box::new(e),
            })
    }

    /// Makes `ifindex` (the host veth in the node's namespace) an endpoint,
    /// or switches it to `entry` in one update.
    pub fn set_endpoint(&mut self, ifindex: u32, entry: &EndpointEntry) -> Result<(), BpfError> {
        self.endpoints
            .insert(encode_endpoint_key(ifindex), entry.encode(), 0)
            .map_err(map_failed(
                MAP_ENDPOINTS,
                "set",
                format!("ifindex {ifindex}"),
            ))
    }

    /// Removes the endpoint (absent is fine). Its packets are dropped from
    /// then on; its connections stay until they expire or
    /// [`flush_conntrack`](Self::flush_conntrack).
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), BpfError> {
        absent_ok(self.endpoints.remove(&encode_endpoint_key(ifindex))).map_err(map_failed(
            MAP_ENDPOINTS,
            "remove",
            format!("ifindex {ifindex}"),
        ))
    }

    pub fn endpoint(&self, ifindex: u32) -> Result<Option<EndpointEntry>, BpfError> {
        found(self.endpoints.get(&encode_endpoint_key(ifindex), 0))
            .map(|v| v.map(|b| EndpointEntry::decode(&b)))
            .map_err(map_failed(
                MAP_ENDPOINTS,
                "read",
                format!("ifindex {ifindex}"),
            ))
    }

    /// Every endpoint, by ifindex.
    pub fn endpoints(&self) -> Result<Vec<(u32, EndpointEntry)>, BpfError> {
        self.endpoints
            .iter()
            .map(|kv| kv.map(|(k, v)| (decode_endpoint_key(&k), EndpointEntry::decode(&v))))
            .collect::<Result<_, _>>()
            .map_err(map_failed(MAP_ENDPOINTS, "dump", String::new()))
    }

    /// Sets the identities of the addresses in `net`.
    pub fn set_ipcache(&mut self, net: IpNet, entry: IpCacheEntry) -> Result<(), BpfError> {
        let key = IpCacheKey::new(net);
        self.ipcache
            .insert(&lpm_key(&key), entry.encode(), 0)
            .map_err(map_failed(MAP_IPCACHE, "set", key.to_string()))
    }

    /// Removes the entry of exactly `net` (absent is fine).
    pub fn remove_ipcache(&mut self, net: IpNet) -> Result<(), BpfError> {
        let key = IpCacheKey::new(net);
        absent_ok(self.ipcache.remove(&lpm_key(&key))).map_err(map_failed(
            MAP_IPCACHE,
            "remove",
            key.to_string(),
        ))
    }

    /// Every IP cache prefix.
    pub fn ipcache_entries(&self) -> Result<Vec<(IpNet, IpCacheEntry)>, BpfError> {
        let mut out = Vec::new();
        for kv in self.ipcache.iter() {
            let (k, v) = kv.map_err(map_failed(MAP_IPCACHE, "dump", String::new()))?;
            // A key no Trellis version writes is not ours to interpret.
            if let Some(key) = IpCacheKey::decode(k.prefix_len(), &k.data()) {
                out.push((key.net(), IpCacheEntry::decode(&v)));
            }
        }
        Ok(out)
    }

    pub fn set_policy(&mut self, key: PolicyKey, entry: PolicyEntry) -> Result<(), BpfError> {
        self.policy
            .insert(key.encode(), entry.encode(), 0)
            .map_err(map_failed(MAP_POLICY, "set", key.to_string()))
    }

    /// Removes a policy entry (absent is fine).
    pub fn remove_policy(&mut self, key: PolicyKey) -> Result<(), BpfError> {
        absent_ok(self.policy.remove(&key.encode())).map_err(map_failed(
            MAP_POLICY,
            "remove",
            key.to_string(),
        ))
    }

    /// Every policy entry of every table.
    pub fn policy_entries(&self) -> Result<Vec<(PolicyKey, PolicyEntry)>, BpfError> {
        self.policy
            .iter()
            .map(|kv| kv.map(|(k, v)| (PolicyKey::decode(&k), PolicyEntry::decode(&v))))
            .collect::<Result<_, _>>()
            .map_err(map_failed(MAP_POLICY, "dump", String::new()))
    }

    /// The connection entry `key`, expired or not.
    pub fn conntrack(&self, key: &CtKey) -> Result<Option<CtEntry>, BpfError> {
        found(self.ct.get(&key.encode(), 0))
            .map(|v| v.map(|b| CtEntry::decode(&b)))
            .map_err(map_failed(MAP_CT, "read", key.to_string()))
    }

    /// Writes a connection entry: for tests and tools (the programs make
    /// their own entries).
    pub fn set_conntrack(&mut self, key: &CtKey, entry: &CtEntry) -> Result<(), BpfError> {
        self.ct
            .insert(key.encode(), entry.encode(), 0)
            .map_err(map_failed(MAP_CT, "set", key.to_string()))
    }

    /// Removes one connection entry (absent is fine): for tests and tools,
    /// such as a benchmark that makes the same packet a new connection again.
    pub fn remove_conntrack(&mut self, key: &CtKey) -> Result<(), BpfError> {
        absent_ok(self.ct.remove(&key.encode())).map_err(map_failed(
            MAP_CT,
            "remove",
            key.to_string(),
        ))
    }

    /// Every connection entry, expired or not.
    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtEntry)>, BpfError> {
        let mut out = Vec::new();
        for kv in self.ct.iter() {
            let (k, v) = kv.map_err(map_failed(MAP_CT, "dump", String::new()))?;
            if let Some(key) = CtKey::decode(&k) {
                out.push((key, CtEntry::decode(&v)));
            }
        }
        Ok(out)
    }

    /// Forgets the connections of endpoint `ifindex` (for when its veth is
    /// gone: a new one may get the same index). How many there were.
    pub fn flush_conntrack(&mut self, ifindex: u32) -> Result<usize, BpfError> {
        let mut doomed = Vec::new();
        for key in self.ct.keys() {
            let key = key.map_err(map_failed(MAP_CT, "dump", String::new()))?;
            // The endpoint is the key's first word.
            if key[..4] == encode_endpoint_key(ifindex) {
                doomed.push(key);
            }
        }
        for key in &doomed {
            absent_ok(self.ct.remove(key)).map_err(map_failed(
                MAP_CT,
                "remove",
                CtKey::decode(key)
                    .map_or_else(|| format!("of endpoint {ifindex}"), |k| k.to_string()),
            ))?;
        }
        Ok(doomed.len())
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, BpfError> {
        let mut out = HashMap::new();
        for reason in Reason::ALL {
            for dir in Direction::ALL {
                let index = reason.counter_index(dir);
                debug_assert!(index < COUNTERS);
                let per_cpu =
                    self.counters
                        .get(&index, 0)
                        .map_err(|source| BpfError::Counters {
                            source: Box::new(source),
                        })?;
                let sum = per_cpu.iter().fold(0u64, |a, n| a.wrapping_add(*n));
                out.insert((reason, dir), sum);
            }
        }
        Ok(Counters(out))
    }

    /// Runs `program` once on `frame` (an Ethernet frame) with `BPF_PROG_TEST_RUN`,
    /// as if it arrived on the device with index `ifindex` *in the calling
    /// thread's network namespace* (the kernel refuses an index it does not
    /// know there with ENODEV; 0 and 1 both mean that namespace's loopback).
    /// It uses this value's maps, so a pinned load's test runs touch the
    /// live tables.
    pub fn test_run(
        &self,
        program: Program,
        ifindex: u32,
        frame: &[u8],
    ) -> Result<Verdict, BpfError> {
        self.test_run_repeat(program, ifindex, frame, 1)
            .map(|(v, _)| v)
    }

    /// [`test_run`](Self::test_run) `repeat` times in the kernel; the verdict
    /// and the mean time per run (including the harness's own overhead,
    /// some 25 ns).
    pub fn test_run_repeat(
        &self,
        program: Program,
        ifindex: u32,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(Verdict, Duration), BpfError> {
        let name = program.name();
        let prog: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or(BpfError::Missing {
                what: "program",
                name,
            })?
            .try_into()
            .map_err(|e| BpfError::TestRun {
                program: name,
                errno: None,
                source: Box::new(e),
            })?;
        // struct __sk_buff up to and including ifindex (offset 40); the
        // kernel zero-fills the rest and takes the device from ifindex.
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(|e| BpfError::TestRun {
                program: name,
                errno: program_errno(&e),
                source: Box::new(e),
            })?;
        Ok((Verdict::from_retval(result.return_value), result.duration))
    }
}

fn layout(map: &'static str) -> impl FnOnce(MapError) -> BpfError {
    move |source| BpfError::MapLayout {
        map,
        source: Box::new(source),
    }
}

fn map_failed(
    map: &'static str,
    op: &'static str,
    key: String,
) -> impl FnOnce(MapError) -> BpfError {
    move |source| BpfError::Map {
        map,
        op,
        key,
        errno: map_errno(&source),
        source: Box::new(source),
    }
}

/// A missing key as `None`.
fn found<V>(r: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) if map_errno(&e) == Some(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deleting what is not there succeeds.
fn absent_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    found(r).map(|_| ())
}

fn lpm_key(key: &IpCacheKey) -> LpmKey<[u8; IpCacheKey::DATA_SIZE]> {
    LpmKey::new(key.prefix_len(), key.data())
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, BpfError> {
    ebpf.take_map(name)
        .ok_or(BpfError::Missing { what: "map", name })
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// `<dir>/v1` and `<dir>/v1/links`, on a bpffs.
fn prepare_pin_dir(dir: &Path) -> Result<PathBuf, BpfError> {
    let versioned = dir.join(PIN_VERSION);
    let links = versioned.join("links");
    fs::create_dir_all(&links).map_err(|source| BpfError::PinDir {
        path: links.clone(),
        source,
    })?;
    if !is_bpffs(&versioned) {
        return Err(BpfError::NotBpffs { path: versioned });
    }
    Ok(versioned)
}

/// Our program `program` in `ebpf`, as the classifier it is.
pub(super) fn classifier(ebpf: &Ebpf, program: Program) -> Result<&SchedClassifier, BpfError> {
    let name = program.name();
    ebpf.program(name)
        .ok_or(BpfError::Missing {
            what: "program",
            name,
        })?
        .try_into()
        .map_err(|e| BpfError::Verify {
            program: name,
            source: Box::new(e),
        })
}

/// [`classifier`], to load or attach it.
pub(super) fn classifier_mut(
    ebpf: &mut Ebpf,
    program: Program,
) -> Result<&mut SchedClassifier, BpfError> {
    let name = program.name();
    ebpf.program_mut(name)
        .ok_or(BpfError::Missing {
            what: "program",
            name,
        })?
        .try_into()
        .map_err(|e| BpfError::Verify {
            program: name,
            source: Box::new(e),
        })
}
