//! The maps' keys and values, byte for byte as the C programs read them.
//!
//! Keep in sync with `node-reconciler/bpf/include/trellis_abi.h` (the
//! layout of docs/design/0004-policy-datapath.md): every struct there has an
//! `encode`/`decode` pair here over a byte array of its exact size, and the
//! unit tests below spell out, byte by byte, what the C layout implies.
//! Integers are in host byte order (what the kernel and the C structs use;
//! little endian on x86_64 and aarch64) unless the ABI says network order.
//! The workspace forbids `unsafe`, so nothing here is `aya::Pod`: the maps
//! hold `[u8; N]`, and these types are the only way in and out.
//!
//! Changing a layout means bumping [`PIN_VERSION`] and `TRELLIS_PIN_VERSION`
//! together. Reason codes are never reused.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Subdirectory of the pin directory that holds the maps of this layout.
pub const PIN_VERSION: &str = "v1";

/// Wildcard identity in policy keys; never a packet's.
pub const ID_ANY: u32 = 0;
/// An address of this node.
pub const ID_HOST: u32 = 1;
/// An address outside every known pod and CIDR (also: no IP cache entry).
pub const ID_WORLD: u32 = 2;
/// The first pod identity.
pub const ID_FIRST_POD: u32 = 256;
/// The first CIDR identity (node-local, one per distinct policy prefix).
pub const ID_FIRST_CIDR: u32 = 0x0100_0000;

/// `trellis_endpoint.flags`: the pod's ingress is isolated.
pub const EP_INGRESS_ISOLATED: u32 = 1 << 0;
/// `trellis_endpoint.flags`: the pod's egress is isolated.
pub const EP_EGRESS_ISOLATED: u32 = 1 << 1;
/// Longest port prefix: an exact port.
pub const PLEN_MAX: u8 = 16;
/// `trellis_endpoint.*_plens`: the table has any-protocol entries.
pub const PLENS_ANY_PROTO: u32 = 1 << 17;

/// `trellis_ct_value.flags`: a packet of the other direction matched.
pub const CT_SEEN_REPLY: u32 = 1 << 0;
/// `trellis_ct_value.flags`: a TCP FIN or RST was seen.
pub const CT_CLOSING: u32 = 1 << 1;

/// `prefixlen` of an IP cache key counts the family and pad bytes first.
pub const IPCACHE_PREFIX_BASE: u32 = 32;
/// `trellis_ipcache_key.family` of IPv4.
pub const FAMILY_IPV4: u8 = 4;
/// `trellis_ipcache_key.family` of IPv6.
pub const FAMILY_IPV6: u8 = 6;

/// Number of reason codes (the counter array holds two per code).
pub const REASON_MAX: u32 = 64;
/// `max_entries` of `trellis_counters`.
pub const COUNTERS: u32 = REASON_MAX * 2;

/// IP protocol numbers the policy tables use.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// A direction, seen from the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// What the pod receives (`trellis_to_pod`, the host veth's egress).
    Ingress,
    /// What the pod sends (`trellis_from_pod`, the host veth's ingress).
    Egress,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// `TRELLIS_DIR_*`.
    pub const fn code(self) -> u8 {
        match self {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        }
    }

    pub const fn from_code(code: u8) -> Option<Direction> {
        match code {
            0 => Some(Direction::Ingress),
            1 => Some(Direction::Egress),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    /// The `trellis_endpoint.flags` bit that isolates this direction.
    pub const fn isolated_flag(self) -> u32 {
        match self {
            Direction::Ingress => EP_INGRESS_ISOLATED,
            Direction::Egress => EP_EGRESS_ISOLATED,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a packet was dropped or passed: `TRELLIS_DROP_*`, `TRELLIS_PASS_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// No `trellis_endpoints` entry for the interface.
    UnknownEndpoint,
    /// Neither ARP, IPv4 nor IPv6 (VLAN-tagged frames too).
    NotIp,
    /// A truncated or invalid header.
    Malformed,
    /// A deny entry matched.
    PolicyDeny,
    /// The direction is isolated and no entry matched.
    NoMatch,
    /// A later IP fragment whose first fragment was not let through.
    Fragment,
    /// Allowed, but the connection entry could not be made.
    CtFull,
    Arp,
    /// A forward connection entry matched.
    Established,
    /// The other direction's connection entry matched.
    Reply,
    /// An ICMP error about a tracked connection.
    Related,
    NotIsolated,
    PolicyAllow,
    /// A later fragment of a datagram whose first fragment passed.
    FragmentFollows,
}

impl Reason {
    pub const ALL: [Reason; 14] = [
        Reason::UnknownEndpoint,
        Reason::NotIp,
        Reason::Malformed,
        Reason::PolicyDeny,
        Reason::NoMatch,
        Reason::Fragment,
        Reason::CtFull,
        Reason::Arp,
        Reason::Established,
        Reason::Reply,
        Reason::Related,
        Reason::NotIsolated,
        Reason::PolicyAllow,
        Reason::FragmentFollows,
    ];

    /// The code in `trellis_abi.h`.
    pub const fn code(self) -> u32 {
        match self {
            Reason::UnknownEndpoint => 1,
            Reason::NotIp => 2,
            Reason::Malformed => 3,
            Reason::PolicyDeny => 4,
            Reason::NoMatch => 5,
            Reason::Fragment => 6,
            Reason::CtFull => 7,
            Reason::Arp => 32,
            Reason::Established => 33,
            Reason::Reply => 34,
            Reason::Related => 35,
            Reason::NotIsolated => 36,
            Reason::PolicyAllow => 37,
            Reason::FragmentFollows => 38,
        }
    }

    pub fn from_code(code: u32) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.code() == code)
    }

    /// Whether packets counted under this reason were dropped.
    pub const fn is_drop(self) -> bool {
        self.code() < 32
    }

    /// A stable snake_case name, for metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::UnknownEndpoint => "unknown_endpoint",
            Reason::NotIp => "not_ip",
            Reason::Malformed => "malformed",
            Reason::PolicyDeny => "policy_deny",
            Reason::NoMatch => "no_match",
            Reason::Fragment => "fragment",
            Reason::CtFull => "ct_full",
            Reason::Arp => "arp",
            Reason::Established => "established",
            Reason::Reply => "reply",
            Reason::Related => "related",
            Reason::NotIsolated => "not_isolated",
            Reason::PolicyAllow => "policy_allow",
            Reason::FragmentFollows => "fragment_follows",
        }
    }

    /// Index of this reason's counter for `dir` in `trellis_counters`.
    pub const fn counter_index(self, dir: Direction) -> u32 {
        self.code() * 2 + dir.code() as u32
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a policy entry decides: `TRELLIS_ACTION_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    /// A code this version does not know; the datapath drops on it.
    Unknown(u8),
}

impl Action {
    pub const fn code(self) -> u8 {
        match self {
            Action::Allow => 1,
            Action::Deny => 2,
            Action::Unknown(c) => c,
        }
    }

    pub const fn from_code(code: u8) -> Action {
        match code {
            1 => Action::Allow,
            2 => Action::Deny,
            c => Action::Unknown(c),
        }
    }
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_ne_bytes(b)
}

fn get_u16(buf: &[u8], at: usize) -> u16 {
    let mut b = [0; 2];
    b.copy_from_slice(&buf[at..at + 2]);
    u16::from_ne_bytes(b)
}

fn get_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_ne_bytes(b)
}

/// `trellis_endpoints` key: the host veth's ifindex in the node's namespace.
pub fn encode_endpoint_key(ifindex: u32) -> [u8; 4] {
    ifindex.to_ne_bytes()
}

pub fn decode_endpoint_key(key: &[u8; 4]) -> u32 {
    u32::from_ne_bytes(*key)
}

/// `struct trellis_endpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndpointEntry {
    pub identity: u32,
    /// `EP_*_ISOLATED`.
    pub flags: u32,
    pub ingress_policy: u32,
    pub egress_policy: u32,
    /// Bit `n` (0–16): the ingress table has entries of port prefix length
    /// `n`; [`PLENS_ANY_PROTO`]: it has any-protocol entries.
    pub ingress_plens: u32,
    pub egress_plens: u32,
}

impl EndpointEntry {
    pub const SIZE: usize = 24;

    /// An endpoint isolated in neither direction.
    pub const fn new(identity: u32) -> EndpointEntry {
        EndpointEntry {
            identity,
            flags: 0,
            ingress_policy: 0,
            egress_policy: 0,
            ingress_plens: 0,
            egress_plens: 0,
        }
    }

    /// Isolates `dir` with table `policy`, which uses the prefix lengths
    /// (and any-protocol bit) in `plens`.
    pub const fn isolate(mut self, dir: Direction, policy: u32, plens: u32) -> EndpointEntry {
        self.flags |= dir.isolated_flag();
        match dir {
            Direction::Ingress => {
                self.ingress_policy = policy;
                self.ingress_plens = plens;
            }
            Direction::Egress => {
                self.egress_policy = policy;
                self.egress_plens = plens;
            }
        }
        self
    }

    pub const fn is_isolated(&self, dir: Direction) -> bool {
        self.flags & dir.isolated_flag() != 0
    }

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        put_u32(&mut b, 0, self.identity);
        put_u32(&mut b, 4, self.flags);
        put_u32(&mut b, 8, self.ingress_policy);
        put_u32(&mut b, 12, self.egress_policy);
        put_u32(&mut b, 16, self.ingress_plens);
        put_u32(&mut b, 20, self.egress_plens);
        b
    }

    pub fn decode(b: &[u8; Self::SIZE]) -> EndpointEntry {
        EndpointEntry {
            identity: get_u32(b, 0),
            flags: get_u32(b, 4),
            ingress_policy: get_u32(b, 8),
            egress_policy: get_u32(b, 12),
            ingress_plens: get_u32(b, 16),
            egress_plens: get_u32(b, 20),
        }
    }
}

/// The `plens` bit of a port prefix length.
pub const fn plen_bit(plen: u8) -> u32 {
    1 << plen
}

/// `struct trellis_ipcache_key`: a prefix, as the LPM trie stores it (the
/// address is truncated to the prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpCacheKey(IpNet);

impl IpCacheKey {
    pub const SIZE: usize = 24;
    /// What follows `prefixlen`: the part aya's `lpm_trie::Key` calls data.
    pub const DATA_SIZE: usize = 20;

    pub fn new(net: IpNet) -> IpCacheKey {
        IpCacheKey(net.trunc())
    }

    pub fn net(&self) -> IpNet {
        self.0
    }

    /// `prefixlen`: 32 bits of family and pad, then the prefix.
    pub fn prefix_len(&self) -> u32 {
        IPCACHE_PREFIX_BASE + u32::from(self.0.prefix_len())
    }

    /// `family`, `pad`, `addr`.
    pub fn data(&self) -> [u8; Self::DATA_SIZE] {
        let mut b = [0; Self::DATA_SIZE];
        match self.0.addr() {
            IpAddr::V4(a) => {
                b[0] = FAMILY_IPV4;
                b[4..8].copy_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                b[0] = FAMILY_IPV6;
                b[4..20].copy_from_slice(&a.octets());
            }
        }
        b
    }

    /// The whole C struct (`prefixlen` in host order).
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        put_u32(&mut b, 0, self.prefix_len());
        b[4..].copy_from_slice(&self.data());
        b
    }

    /// The key from its `prefixlen` and data; `None` when they name no
    /// prefix (a family other than 4 and 6, or a length out of range).
    pub fn decode(prefix_len: u32, data: &[u8; Self::DATA_SIZE]) -> Option<IpCacheKey> {
        let bits = u8::try_from(prefix_len.checked_sub(IPCACHE_PREFIX_BASE)?).ok()?;
        let net = match data[0] {
            FAMILY_IPV4 => {
                let mut a = [0; 4];
                a.copy_from_slice(&data[4..8]);
                IpNet::new(IpAddr::V4(Ipv4Addr::from(a)), bits).ok()?
            }
            FAMILY_IPV6 => {
                let mut a = [0; 16];
                a.copy_from_slice(&data[4..20]);
                IpNet::new(IpAddr::V6(Ipv6Addr::from(a)), bits).ok()?
            }
            _ => return None,
        };
        Some(IpCacheKey::new(net))
    }
}

impl fmt::Display for IpCacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// `struct trellis_ipcache_value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpCacheEntry {
    /// The pod's identity, or [`ID_HOST`] / [`ID_WORLD`].
    pub identity: u32,
    /// The identity of the longest policy prefix containing the address.
    pub cidr_identity: u32,
}

impl IpCacheEntry {
    pub const SIZE: usize = 8;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        put_u32(&mut b, 0, self.identity);
        put_u32(&mut b, 4, self.cidr_identity);
        b
    }

    pub fn decode(b: &[u8; Self::SIZE]) -> IpCacheEntry {
        IpCacheEntry {
            identity: get_u32(b, 0),
            cidr_identity: get_u32(b, 4),
        }
    }
}

/// `struct trellis_policy_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub policy: u32,
    pub identity: u32,
    /// 0: any protocol (then `plen` and `port` are 0).
    pub proto: u8,
    pub plen: u8,
    /// Host order, masked to its `plen` leading bits.
    pub port: u16,
}

impl PolicyKey {
    pub const SIZE: usize = 12;

    /// The any-protocol entry of `identity` in table `policy`.
    pub const fn any_protocol(policy: u32, identity: u32) -> PolicyKey {
        PolicyKey {
            policy,
            identity,
            proto: 0,
            plen: 0,
            port: 0,
        }
    }

    /// The entry for the ports of `proto` whose `plen` leading bits are
    /// those of `port` (`plen` 16: exactly `port`; 0: every port). `port`
    /// is masked here; `plen` above 16 counts as 16.
    pub const fn ports(policy: u32, identity: u32, proto: u8, port: u16, plen: u8) -> PolicyKey {
        let plen = if plen > PLEN_MAX { PLEN_MAX } else { plen };
        let port = if plen == 0 {
            0
        } else {
            port & (0xffff_u16 << (16 - plen))
        };
        PolicyKey {
            policy,
            identity,
            proto,
            plen,
            port,
        }
    }

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        put_u32(&mut b, 0, self.policy);
        put_u32(&mut b, 4, self.identity);
        b[8] = self.proto;
        b[9] = self.plen;
        put_u16(&mut b, 10, self.port);
        b
    }

    pub fn decode(b: &[u8; Self::SIZE]) -> PolicyKey {
        PolicyKey {
            policy: get_u32(b, 0),
            identity: get_u32(b, 4),
            proto: b[8],
            plen: b[9],
            port: get_u16(b, 10),
        }
    }
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy {} identity {} ", self.policy, self.identity)?;
        if self.proto == 0 {
            f.write_str("any protocol")
        } else {
            write!(f, "proto {} port {}/{}", self.proto, self.port, self.plen)
        }
    }
}

/// `struct trellis_policy_value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyEntry {
    /// Provenance index from the compiler (for counters and "why").
    pub rule: u32,
    pub action: Action,
}

impl PolicyEntry {
    pub const SIZE: usize = 8;

    pub const fn allow(rule: u32) -> PolicyEntry {
        PolicyEntry {
            rule,
            action: Action::Allow,
        }
    }

    pub const fn deny(rule: u32) -> PolicyEntry {
        PolicyEntry {
            rule,
            action: Action::Deny,
        }
    }

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        put_u32(&mut b, 0, self.rule);
        b[4] = self.action.code();
        b
    }

    pub fn decode(b: &[u8; Self::SIZE]) -> PolicyEntry {
        PolicyEntry {
            rule: get_u32(b, 0),
            action: Action::from_code(b[4]),
        }
    }
}

/// IPv4 addresses in conntrack keys: `::ffff:a.b.c.d`.
fn ct_addr(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn ct_addr_decode(b: &[u8]) -> IpAddr {
    let mut a = [0; 16];
    a.copy_from_slice(b);
    let v6 = Ipv6Addr::from(a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// `struct trellis_ct_key`: one connection of one endpoint, as first seen
/// in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// The endpoint's ifindex.
    pub endpoint: u32,
    pub dir: Direction,
    pub proto: u8,
    /// ICMP echo: the identifier, in both ports.
    pub sport: u16,
    pub dport: u16,
    pub saddr: IpAddr,
    pub daddr: IpAddr,
}

impl CtKey {
    pub const SIZE: usize = 44;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        put_u32(&mut b, 0, self.endpoint);
        b[4] = self.dir.code();
        b[5] = self.proto;
        // Ports in network order, as they are on the wire.
        b[8..10].copy_from_slice(&self.sport.to_be_bytes());
        b[10..12].copy_from_slice(&self.dport.to_be_bytes());
        b[12..28].copy_from_slice(&ct_addr(self.saddr));
        b[28..44].copy_from_slice(&ct_addr(self.daddr));
        b
    }

    /// `None` for a direction code that is neither 0 nor 1.
    pub fn decode(b: &[u8; Self::SIZE]) -> Option<CtKey> {
        Some(CtKey {
            endpoint: get_u32(b, 0),
            dir: Direction::from_code(b[4])?,
            proto: b[5],
            sport: u16::from_be_bytes([b[8], b[9]]),
            dport: u16::from_be_bytes([b[10], b[11]]),
            saddr: ct_addr_decode(&b[12..28]),
            daddr: ct_addr_decode(&b[28..44]),
        })
    }
}

impl fmt::Display for CtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "endpoint {} {} proto {} {}:{} → {}:{}",
            self.endpoint, self.dir, self.proto, self.saddr, self.sport, self.daddr, self.dport
        )
    }
}

/// `struct trellis_ct_value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// `CLOCK_MONOTONIC` nanoseconds, at the resolution of a tick (the
    /// programs read `bpf_ktime_get_coarse_ns`).
    pub expires_ns: u64,
    /// `CT_SEEN_REPLY`, `CT_CLOSING`.
    pub flags: u32,
}

impl CtEntry {
    pub const SIZE: usize = 16;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        put_u64(&mut b, 0, self.expires_ns);
        put_u32(&mut b, 8, self.flags);
        b
    }

    pub fn decode(b: &[u8; Self::SIZE]) -> CtEntry {
        CtEntry {
            expires_ns: get_u64(b, 0),
            flags: get_u32(b, 8),
        }
    }
}

#[cfg(test)]
#[cfg(target_endian = "little")]
mod tests {
    use super::*;

    #[test]
    fn endpoint_entry_is_six_host_order_words() {
        let e = EndpointEntry {
            identity: 0x0102_0304,
            flags: EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED,
            ingress_policy: 0x0a0b_0c0d,
            egress_policy: 7,
            ingress_plens: PLENS_ANY_PROTO | plen_bit(16) | plen_bit(0),
            egress_plens: plen_bit(8),
        };
        let b = e.encode();
        assert_eq!(
            b,
            [
                4, 3, 2, 1, // identity
                3, 0, 0, 0, // flags: bit 0 ingress, bit 1 egress
                0x0d, 0x0c, 0x0b, 0x0a, // ingress_policy
                7, 0, 0, 0, // egress_policy
                1, 0, 3, 0, // ingress_plens: bits 0, 16, 17
                0, 1, 0, 0, // egress_plens: bit 8
            ]
        );
        assert_eq!(EndpointEntry::decode(&b), e);
        assert_eq!(encode_endpoint_key(0x0102_0304), [4, 3, 2, 1]);
        assert_eq!(decode_endpoint_key(&[4, 3, 2, 1]), 0x0102_0304);
    }

    #[test]
    fn endpoint_builder_sets_the_flag_table_and_lengths_of_one_direction() {
        let e = EndpointEntry::new(300).isolate(Direction::Egress, 9, plen_bit(16));
        assert!(e.is_isolated(Direction::Egress));
        assert!(!e.is_isolated(Direction::Ingress));
        assert_eq!((e.egress_policy, e.egress_plens), (9, 1 << 16));
        assert_eq!((e.ingress_policy, e.ingress_plens), (0, 0));
    }

    #[test]
    fn ipcache_key_counts_family_and_pad_in_its_prefix_length() {
        let k = IpCacheKey::new("10.1.2.3/24".parse().expect("net"));
        assert_eq!(k.net().to_string(), "10.1.2.0/24", "host bits are cleared");
        assert_eq!(k.prefix_len(), 56);
        assert_eq!(
            k.encode(),
            [
                56, 0, 0, 0, // prefixlen = 32 + 24
                4, 0, 0, 0, // family, pad[3]
                10, 1, 2, 0, // IPv4 in the first 4 bytes of addr
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // the rest of addr is zero
            ]
        );
        assert_eq!(IpCacheKey::decode(56, &k.data()), Some(k));

        let k6 = IpCacheKey::new("fd00::1/128".parse().expect("net"));
        let b = k6.encode();
        assert_eq!(&b[..8], &[160, 0, 0, 0, 6, 0, 0, 0]);
        assert_eq!(
            &b[8..],
            &"fd00::1".parse::<Ipv6Addr>().expect("ip").octets()
        );
        assert_eq!(IpCacheKey::decode(160, &k6.data()), Some(k6));
        assert_eq!(IpCacheKey::decode(16, &k6.data()), None);
        let mut bad = k6.data();
        bad[0] = 5;
        assert_eq!(IpCacheKey::decode(160, &bad), None);
    }

    #[test]
    fn ipcache_entry_is_two_host_order_words() {
        let v = IpCacheEntry {
            identity: 256,
            cidr_identity: ID_FIRST_CIDR + 1,
        };
        assert_eq!(v.encode(), [0, 1, 0, 0, 1, 0, 0, 1]);
        assert_eq!(IpCacheEntry::decode(&v.encode()), v);
    }

    #[test]
    fn policy_key_holds_the_port_in_host_order_masked_to_its_prefix() {
        let k = PolicyKey::ports(0x11, 0x0100, PROTO_TCP, 0x1f91, 12);
        assert_eq!(k.port, 0x1f90, "the low 4 bits are not part of a /12");
        assert_eq!(
            k.encode(),
            [
                0x11, 0, 0, 0, // policy
                0, 1, 0, 0, // identity
                6, 12, // proto, plen
                0x90, 0x1f, // port, host order
            ]
        );
        assert_eq!(PolicyKey::decode(&k.encode()), k);
        assert_eq!(PolicyKey::ports(1, 2, PROTO_UDP, 53, 16).port, 53);
        assert_eq!(PolicyKey::ports(1, 2, PROTO_UDP, 53, 0).port, 0);
        assert_eq!(PolicyKey::ports(1, 2, PROTO_UDP, 53, 99).plen, 16);
        assert_eq!(
            PolicyKey::any_protocol(3, ID_ANY).encode(),
            [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn policy_entry_is_rule_action_and_zero_pad() {
        assert_eq!(
            PolicyEntry::allow(0x0201).encode(),
            [1, 2, 0, 0, 1, 0, 0, 0]
        );
        assert_eq!(PolicyEntry::deny(5).encode(), [5, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(
            PolicyEntry::decode(&[5, 0, 0, 0, 9, 0, 0, 0]).action,
            Action::Unknown(9)
        );
    }

    #[test]
    fn ct_key_has_network_order_ports_and_mapped_ipv4() {
        let k = CtKey {
            endpoint: 5,
            dir: Direction::Egress,
            proto: PROTO_TCP,
            sport: 0x1234,
            dport: 80,
            saddr: "10.0.0.1".parse().expect("ip"),
            daddr: "10.0.0.2".parse().expect("ip"),
        };
        let b = k.encode();
        assert_eq!(&b[..12], &[5, 0, 0, 0, 1, 6, 0, 0, 0x12, 0x34, 0, 80]);
        assert_eq!(
            &b[12..28],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]
        );
        assert_eq!(
            &b[28..44],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2]
        );
        assert_eq!(CtKey::decode(&b), Some(k));

        let k6 = CtKey {
            saddr: "fd00::1".parse().expect("ip"),
            dir: Direction::Ingress,
            ..k
        };
        let b6 = k6.encode();
        assert_eq!(b6[4], 0);
        assert_eq!(&b6[12..14], &[0xfd, 0]);
        assert_eq!(CtKey::decode(&b6), Some(k6));
        let mut bad = b6;
        bad[4] = 2;
        assert_eq!(CtKey::decode(&bad), None);
    }

    #[test]
    fn ct_entry_is_expiry_flags_and_pad() {
        let v = CtEntry {
            expires_ns: 0x0102_0304_0506_0708,
            flags: CT_SEEN_REPLY | CT_CLOSING,
        };
        assert_eq!(v.encode(), [8, 7, 6, 5, 4, 3, 2, 1, 3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(CtEntry::decode(&v.encode()), v);
    }

    #[test]
    fn reason_codes_and_counter_indexes_match_the_header() {
        // The header's values, spelled out again: a change on either side
        // must show up here.
        let header = [
            (Reason::UnknownEndpoint, 1),
            (Reason::NotIp, 2),
            (Reason::Malformed, 3),
            (Reason::PolicyDeny, 4),
            (Reason::NoMatch, 5),
            (Reason::Fragment, 6),
            (Reason::CtFull, 7),
            (Reason::Arp, 32),
            (Reason::Established, 33),
            (Reason::Reply, 34),
            (Reason::Related, 35),
            (Reason::NotIsolated, 36),
            (Reason::PolicyAllow, 37),
            (Reason::FragmentFollows, 38),
        ];
        assert_eq!(header.len(), Reason::ALL.len());
        for (reason, code) in header {
            assert_eq!(reason.code(), code, "{reason}");
            assert_eq!(Reason::from_code(code), Some(reason));
            assert_eq!(reason.is_drop(), code < 32, "{reason}");
            assert!(reason.counter_index(Direction::Egress) < COUNTERS);
        }
        assert_eq!(Reason::NoMatch.counter_index(Direction::Ingress), 10);
        assert_eq!(Reason::NoMatch.counter_index(Direction::Egress), 11);
    }

    /// `#define NAME VALUE` lines of the C header, evaluated (decimal and
    /// hex literals, `u` suffixes, `<<`, `*`, other defines, strings).
    fn header_defines() -> std::collections::HashMap<String, String> {
        include_str!("../../bpf/include/trellis_abi.h")
            .lines()
            .filter_map(|l| l.strip_prefix("#define "))
            .filter_map(|l| {
                let l = l.split("/*").next().unwrap_or_default().trim();
                let (name, value) = l.split_once(char::is_whitespace)?;
                Some((name.to_owned(), value.trim().to_owned()))
            })
            .collect()
    }

    fn eval(defines: &std::collections::HashMap<String, String>, expr: &str) -> u64 {
        let e = expr
            .trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .trim();
        if let Some((a, b)) = e.split_once("<<") {
            return eval(defines, a) << eval(defines, b);
        }
        if let Some((a, b)) = e.split_once('*') {
            return eval(defines, a) * eval(defines, b);
        }
        if let Some(v) = defines.get(e) {
            return eval(defines, v);
        }
        let lit = e.trim_end_matches('u');
        match lit.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => lit.parse(),
        }
        .unwrap_or_else(|_| panic!("cannot evaluate {expr:?}"))
    }

    #[test]
    fn constants_match_the_c_header() {
        let d = header_defines();
        let v = |name: &str| {
            eval(
                &d,
                d.get(name).unwrap_or_else(|| panic!("{name} not defined")),
            )
        };
        assert_eq!(d["TRELLIS_PIN_VERSION"], format!("\"{PIN_VERSION}\""));
        for (name, value) in [
            ("TRELLIS_ID_ANY", u64::from(ID_ANY)),
            ("TRELLIS_ID_HOST", u64::from(ID_HOST)),
            ("TRELLIS_ID_WORLD", u64::from(ID_WORLD)),
            ("TRELLIS_ID_FIRST_POD", u64::from(ID_FIRST_POD)),
            ("TRELLIS_ID_FIRST_CIDR", u64::from(ID_FIRST_CIDR)),
            ("TRELLIS_DIR_INGRESS", u64::from(Direction::Ingress.code())),
            ("TRELLIS_DIR_EGRESS", u64::from(Direction::Egress.code())),
            (
                "TRELLIS_EP_INGRESS_ISOLATED",
                u64::from(EP_INGRESS_ISOLATED),
            ),
            ("TRELLIS_EP_EGRESS_ISOLATED", u64::from(EP_EGRESS_ISOLATED)),
            ("TRELLIS_PLEN_MAX", u64::from(PLEN_MAX)),
            ("TRELLIS_PLENS_ANY_PROTO", u64::from(PLENS_ANY_PROTO)),
            ("TRELLIS_ACTION_ALLOW", u64::from(Action::Allow.code())),
            ("TRELLIS_ACTION_DENY", u64::from(Action::Deny.code())),
            ("TRELLIS_FAMILY_IPV4", u64::from(FAMILY_IPV4)),
            ("TRELLIS_FAMILY_IPV6", u64::from(FAMILY_IPV6)),
            (
                "TRELLIS_IPCACHE_PREFIX_BASE",
                u64::from(IPCACHE_PREFIX_BASE),
            ),
            ("TRELLIS_CT_SEEN_REPLY", u64::from(CT_SEEN_REPLY)),
            ("TRELLIS_CT_CLOSING", u64::from(CT_CLOSING)),
            ("TRELLIS_REASON_MAX", u64::from(REASON_MAX)),
            ("TRELLIS_COUNTERS", u64::from(COUNTERS)),
        ] {
            assert_eq!(v(name), value, "{name}");
        }
        // Every reason has its define, named after it, and no define is
        // missing a reason.
        for reason in Reason::ALL {
            let kind = if reason.is_drop() { "DROP" } else { "PASS" };
            let name = format!("TRELLIS_{kind}_{}", reason.name().to_uppercase());
            assert_eq!(v(&name), u64::from(reason.code()), "{name}");
        }
        let reasons = d
            .keys()
            .filter(|k| k.starts_with("TRELLIS_DROP_") || k.starts_with("TRELLIS_PASS_"))
            .count();
        assert_eq!(reasons, Reason::ALL.len());
    }

    #[test]
    fn sizes_match_the_c_header() {
        let asserted: std::collections::HashMap<&str, usize> =
            include_str!("../../bpf/include/trellis_abi.h")
                .lines()
                .filter_map(|l| l.strip_prefix("_Static_assert(sizeof(struct "))
                .filter_map(|l| {
                    let (name, rest) = l.split_once(')')?;
                    let size = rest.trim_start_matches(" == ").split(',').next()?;
                    Some((name, size.parse().ok()?))
                })
                .collect();
        for (name, size) in [
            ("trellis_endpoint", EndpointEntry::SIZE),
            ("trellis_ipcache_key", IpCacheKey::SIZE),
            ("trellis_ipcache_value", IpCacheEntry::SIZE),
            ("trellis_policy_key", PolicyKey::SIZE),
            ("trellis_policy_value", PolicyEntry::SIZE),
            ("trellis_ct_key", CtKey::SIZE),
            ("trellis_ct_value", CtEntry::SIZE),
        ] {
            assert_eq!(asserted.get(name), Some(&size), "struct {name}");
        }
        assert_eq!(IpCacheKey::SIZE, 4 + IpCacheKey::DATA_SIZE);
    }
}
