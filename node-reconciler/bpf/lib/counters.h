/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* One counter per (reason, direction); every verdict goes through here. */
#ifndef TRELLIS_COUNTERS_H
#define TRELLIS_COUNTERS_H

#include "maps.h"

static __always_inline void count(__u32 reason, __u8 dir)
{
	__u32 index = reason * 2 + (dir & 1);
	__u64 *n = bpf_map_lookup_elem(&trellis_counters, &index);

	/* Per-CPU: no other writer, no atomic needed. */
	if (n)
		*n += 1;
}

static __always_inline int pass(__u32 reason, __u8 dir)
{
	count(reason, dir);
	return TRELLIS_PASS;
}

static __always_inline int drop(__u32 reason, __u8 dir)
{
	count(reason, dir);
	return TRELLIS_DROP;
}

#endif /* TRELLIS_COUNTERS_H */
