/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The map ABI between the policy programs and trellis-node, as
 * docs/design/0004-policy-datapath.md defines it.
 *
 * Keep in sync with node-reconciler/src/bpf/abi.rs: every struct, size,
 * offset and constant here has its twin there, checked by the assertions
 * below and by the unit tests of abi.rs. Changing a layout means bumping
 * TRELLIS_PIN_VERSION (and PIN_VERSION in Rust): aya reuses a pinned map
 * without checking its layout. Retired codes are never reused.
 */
#ifndef TRELLIS_ABI_H
#define TRELLIS_ABI_H

#include <linux/types.h>

/* Subdirectory of the pin directory the maps of this layout live in. */
#define TRELLIS_PIN_VERSION "v1"

/* Reserved identities (0004, decision 1). */
#define TRELLIS_ID_ANY 0u   /* wildcard in policy keys, never a packet's */
#define TRELLIS_ID_HOST 1u  /* an address of this node */
#define TRELLIS_ID_WORLD 2u /* outside every known pod and CIDR */
#define TRELLIS_ID_FIRST_POD 256u
#define TRELLIS_ID_FIRST_CIDR 0x01000000u

/* Directions, seen from the pod: what it receives, what it sends. */
#define TRELLIS_DIR_INGRESS 0
#define TRELLIS_DIR_EGRESS 1

/* struct trellis_endpoint.flags */
#define TRELLIS_EP_INGRESS_ISOLATED (1u << 0)
#define TRELLIS_EP_EGRESS_ISOLATED (1u << 1)

/* struct trellis_endpoint.*_plens: bit n (0..16) for port prefix length n,
 * and this bit when the table has any-protocol entries. */
#define TRELLIS_PLEN_MAX 16
#define TRELLIS_PLENS_ANY_PROTO (1u << 17)

/* struct trellis_policy_value.action */
#define TRELLIS_ACTION_ALLOW 1
#define TRELLIS_ACTION_DENY 2

/* struct trellis_ipcache_key.family */
#define TRELLIS_FAMILY_IPV4 4
#define TRELLIS_FAMILY_IPV6 6
/* trellis_ipcache_key.prefixlen counts family and pad before the address. */
#define TRELLIS_IPCACHE_PREFIX_BASE 32

/* trellis_ct_value.flags */
#define TRELLIS_CT_SEEN_REPLY (1u << 0) /* a packet of the other direction matched */
#define TRELLIS_CT_CLOSING (1u << 1)    /* TCP FIN or RST seen */

/*
 * Why a packet passed or was dropped: the counter index is
 * reason * 2 + direction. Drops below 32, passes from 32.
 */
#define TRELLIS_DROP_UNKNOWN_ENDPOINT 1 /* no trellis_endpoints entry for the ifindex */
#define TRELLIS_DROP_NOT_IP 2           /* neither ARP, IPv4 nor IPv6 (VLAN tags too) */
#define TRELLIS_DROP_MALFORMED 3        /* truncated or invalid header */
#define TRELLIS_DROP_POLICY_DENY 4      /* a deny entry matched */
#define TRELLIS_DROP_NO_MATCH 5         /* isolated and no entry matched */
#define TRELLIS_DROP_FRAGMENT 6         /* later fragment whose first was not let through */
#define TRELLIS_DROP_CT_FULL 7          /* allowed, but the connection entry could not be made */
#define TRELLIS_PASS_ARP 32
#define TRELLIS_PASS_ESTABLISHED 33 /* a forward connection entry matched */
#define TRELLIS_PASS_REPLY 34       /* a connection entry of the other direction matched */
#define TRELLIS_PASS_RELATED 35     /* ICMP error about a tracked connection */
#define TRELLIS_PASS_NOT_ISOLATED 36
#define TRELLIS_PASS_POLICY_ALLOW 37
#define TRELLIS_PASS_FRAGMENT_FOLLOWS 38 /* later fragment whose first was let through */
#define TRELLIS_REASON_MAX 64
#define TRELLIS_COUNTERS (TRELLIS_REASON_MAX * 2)

/* trellis_endpoints: key __u32 ifindex of the host-side veth. */
struct trellis_endpoint {
	__u32 identity;
	__u32 flags;
	__u32 ingress_policy;
	__u32 egress_policy;
	__u32 ingress_plens;
	__u32 egress_plens;
};

/* trellis_ipcache: LPM trie. IPv4 in addr[0..4], the rest zero. */
struct trellis_ipcache_key {
	__u32 prefixlen;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

struct trellis_ipcache_value {
	__u32 identity;
	__u32 cidr_identity;
};

/* trellis_policy: proto 0 = any protocol (plen and port 0); port is in
 * host byte order, already masked to its plen leading bits. */
struct trellis_policy_key {
	__u32 policy;
	__u32 identity;
	__u8 proto;
	__u8 plen;
	__u16 port;
};

struct trellis_policy_value {
	__u32 rule;
	__u8 action;
	__u8 pad[3];
};

/* trellis_ct: ports in network byte order, IPv4 as ::ffff:a.b.c.d. ICMP
 * echo uses its identifier as both ports. */
struct trellis_ct_key {
	__u32 endpoint;
	__u8 dir;
	__u8 proto;
	__u16 pad;
	__u16 sport;
	__u16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
};

struct trellis_ct_value {
	__u64 expires_ns; /* CLOCK_MONOTONIC (bpf_ktime_get_coarse_ns(): tick resolution) */
	__u32 flags;
	__u32 pad;
};

/*
 * trellis_frags: the datapath's own record of first fragments it let
 * through (0004 leaves fragments open; see lib/fragments.h). Not written
 * by trellis-node, only cleared when a pin version is retired.
 */
struct trellis_frag_key {
	__u32 endpoint;
	__u8 dir;
	__u8 proto; /* IPv4: protocol; IPv6: the fragment header's next header */
	__u16 pad;
	__u32 id; /* IPv4: 16-bit identification; IPv6: 32-bit */
	__u8 saddr[16];
	__u8 daddr[16];
};

struct trellis_frag_value {
	__u64 expires_ns;
};

_Static_assert(sizeof(struct trellis_endpoint) == 24, "trellis_endpoint layout");
_Static_assert(sizeof(struct trellis_ipcache_key) == 24, "trellis_ipcache_key layout");
_Static_assert(__builtin_offsetof(struct trellis_ipcache_key, family) == 4, "ipcache family");
_Static_assert(__builtin_offsetof(struct trellis_ipcache_key, addr) == 8, "ipcache addr");
_Static_assert(sizeof(struct trellis_ipcache_value) == 8, "trellis_ipcache_value layout");
_Static_assert(sizeof(struct trellis_policy_key) == 12, "trellis_policy_key layout");
_Static_assert(__builtin_offsetof(struct trellis_policy_key, proto) == 8, "policy proto");
_Static_assert(__builtin_offsetof(struct trellis_policy_key, plen) == 9, "policy plen");
_Static_assert(__builtin_offsetof(struct trellis_policy_key, port) == 10, "policy port");
_Static_assert(sizeof(struct trellis_policy_value) == 8, "trellis_policy_value layout");
_Static_assert(__builtin_offsetof(struct trellis_policy_value, action) == 4, "policy action");
_Static_assert(sizeof(struct trellis_ct_key) == 44, "trellis_ct_key layout");
_Static_assert(__builtin_offsetof(struct trellis_ct_key, dir) == 4, "ct dir");
_Static_assert(__builtin_offsetof(struct trellis_ct_key, proto) == 5, "ct proto");
_Static_assert(__builtin_offsetof(struct trellis_ct_key, sport) == 8, "ct sport");
_Static_assert(__builtin_offsetof(struct trellis_ct_key, dport) == 10, "ct dport");
_Static_assert(__builtin_offsetof(struct trellis_ct_key, saddr) == 12, "ct saddr");
_Static_assert(__builtin_offsetof(struct trellis_ct_key, daddr) == 28, "ct daddr");
_Static_assert(sizeof(struct trellis_ct_value) == 16, "trellis_ct_value layout");
_Static_assert(__builtin_offsetof(struct trellis_ct_value, flags) == 8, "ct flags");
_Static_assert(sizeof(struct trellis_frag_key) == 44, "trellis_frag_key layout");
_Static_assert(sizeof(struct trellis_frag_value) == 8, "trellis_frag_value layout");

#endif /* TRELLIS_ABI_H */
