/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * IP fragments, which 0004 leaves open; the decision, fail-closed:
 *
 * Only the first fragment of a datagram carries the L4 header, so only it
 * can be matched against connections and port rules. Later fragments are
 * let through exactly when the first fragment of the same datagram (same
 * endpoint, direction, addresses, protocol and identification, as RFC 791
 * and RFC 8200 group them) was let through shortly before, for whatever
 * reason; every other later fragment is dropped. Consequences:
 * - a later fragment that overtakes its first fragment is dropped, and the
 *   receiver's reassembly times out (a retransmission recovers);
 * - a datagram whose first fragment was denied never gets its other
 *   fragments past us, so no one can smuggle data in fragments alone;
 * - where the direction is not isolated, fragments pass like everything.
 * The kernel has not reassembled anything at tc (nf_defrag runs later, at
 * PREROUTING), which is why the programs see fragments at all.
 */
#ifndef TRELLIS_FRAGMENTS_H
#define TRELLIS_FRAGMENTS_H

#include "maps.h"
#include "parse.h"

/* Fragments of one datagram follow each other within microseconds; the
 * bound only limits how long an identification stays usable. */
#define FRAG_LIFETIME (5 * 1000000000ull)

static __always_inline void frag_key_of(struct trellis_frag_key *k, __u32 endpoint, __u8 dir,
					const struct trellis_pkt *p)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->endpoint = endpoint;
	k->dir = dir;
	k->proto = p->frag_proto;
	k->id = p->frag_id;
	__builtin_memcpy(k->saddr, p->t.saddr, 16);
	__builtin_memcpy(k->daddr, p->t.daddr, 16);
}

/* The first fragment p was let through: its followers may pass. */
static __always_inline void frag_remember(__u32 endpoint, __u8 dir, const struct trellis_pkt *p,
					  __u64 now)
{
	struct trellis_frag_key k;
	struct trellis_frag_value v = { .expires_ns = now + FRAG_LIFETIME };

	frag_key_of(&k, endpoint, dir, p);
	/* Best effort: when the map refuses, the later fragments are dropped. */
	bpf_map_update_elem(&trellis_frags, &k, &v, BPF_ANY);
}

/* Whether the later fragment p follows a first fragment let through. */
static __always_inline int frag_known(__u32 endpoint, __u8 dir, const struct trellis_pkt *p,
				      __u64 now)
{
	struct trellis_frag_key k;
	struct trellis_frag_value *v;

	frag_key_of(&k, endpoint, dir, p);
	v = bpf_map_lookup_elem(&trellis_frags, &k);
	return v && v->expires_ns > now;
}

#endif /* TRELLIS_FRAGMENTS_H */
