/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Step 4 of 0004: the remote address's identities, then the endpoint's
 * table. The order of the lookups is the whole precedence model: the
 * compiler (trellis-policy) decided everything else and exports `lookup`,
 * the mirror of policy_match below. Keep the two in the same order.
 */
#ifndef TRELLIS_POLICY_H
#define TRELLIS_POLICY_H

#include "maps.h"
#include "parse.h"

/* The remote address's identity and CIDR identity; WORLD/WORLD if the IP
 * cache has no prefix containing it. */
static __always_inline void ipcache_lookup(const struct trellis_pkt *p, const __be32 addr[4],
					   __u32 *identity, __u32 *cidr_identity)
{
	struct trellis_ipcache_key k = {};
	struct trellis_ipcache_value *v;

	k.family = p->family;
	if (p->family == TRELLIS_FAMILY_IPV4) {
		k.prefixlen = TRELLIS_IPCACHE_PREFIX_BASE + 32;
		/* addr holds ::ffff:a.b.c.d; the cache keys IPv4 in the first 4 bytes. */
		__builtin_memcpy(k.addr, &addr[3], 4);
	} else {
		k.prefixlen = TRELLIS_IPCACHE_PREFIX_BASE + 128;
		__builtin_memcpy(k.addr, addr, 16);
	}
	v = bpf_map_lookup_elem(&trellis_ipcache, &k);
	if (v) {
		*identity = v->identity;
		*cidr_identity = v->cidr_identity;
	} else {
		*identity = TRELLIS_ID_WORLD;
		*cidr_identity = TRELLIS_ID_WORLD;
	}
}

/*
 * The entry of table `policy` for `identity`, most specific first: for TCP,
 * UDP and SCTP the port prefixes from the longest (16: the exact port) to
 * the shortest (0: every port) among the lengths the table uses, then the
 * any-protocol entry if the table has any (so "every protocol, except TCP
 * 22" is two entries of one identity: design 0006). 1 and *out filled when
 * one exists.
 */
static __always_inline int policy_match_identity(__u32 policy, __u32 identity, __u32 plens,
						 const struct trellis_pkt *p,
						 struct trellis_policy_value *out)
{
	struct trellis_policy_key k = {};
	struct trellis_policy_value *v;
	__u16 port;

	k.policy = policy;
	k.identity = identity;
	if (p->ports) {
		k.proto = p->t.proto;
		port = bpf_ntohs(p->t.dport);
		for (int n = TRELLIS_PLEN_MAX; n >= 0; n--) {
			if (!(plens & (1u << n)))
				continue;
			k.plen = n;
			/* The port's n leading bits; n = 0 keeps none. */
			k.port = n ? (__u16)(port & (0xffffu << (16 - n))) : 0;
			v = bpf_map_lookup_elem(&trellis_policy, &k);
			if (v) {
				*out = *v;
				return 1;
			}
		}
	}
	if (plens & TRELLIS_PLENS_ANY_PROTO) {
		/* The any-protocol key: protocol, length and port all 0. */
		k.proto = 0;
		k.plen = 0;
		k.port = 0;
		v = bpf_map_lookup_elem(&trellis_policy, &k);
		if (v) {
			*out = *v;
			return 1;
		}
	}
	return 0;
}

/* The deciding entry for a packet whose remote end has these identities:
 * its own, its CIDR's, then ANY, each once. 1 and *out when one exists. */
static __always_inline int policy_match(__u32 policy, __u32 plens, __u32 identity,
					__u32 cidr_identity, const struct trellis_pkt *p,
					struct trellis_policy_value *out)
{
	if (policy_match_identity(policy, identity, plens, p, out))
		return 1;
	if (cidr_identity != identity &&
	    policy_match_identity(policy, cidr_identity, plens, p, out))
		return 1;
	if (identity != TRELLIS_ID_ANY && cidr_identity != TRELLIS_ID_ANY &&
	    policy_match_identity(policy, TRELLIS_ID_ANY, plens, p, out))
		return 1;
	return 0;
}

#endif /* TRELLIS_POLICY_H */
