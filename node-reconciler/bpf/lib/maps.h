/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Every map of the policy datapath, in one place. All are pinned by name
 * (trellis-node loads them with a default pin directory of
 * <bpffs-root>/<TRELLIS_PIN_VERSION>), so a restart or an upgrade of the
 * programs keeps the tables and the connections. Map names must not contain
 * '.': bpffs refuses such pin names.
 *
 * build.rs also compiles each program with TRELLIS_UNPINNED, which drops
 * only the pinning attribute: aya pins every LIBBPF_PIN_BY_NAME map (in
 * /sys/fs/bpf when given no directory), and tests and benchmarks need maps
 * of their own, without a bpffs. The code is the same.
 */
#ifndef TRELLIS_MAPS_H
#define TRELLIS_MAPS_H

#include "common.h"

#ifdef TRELLIS_UNPINNED
#define TRELLIS_PINNING
#else
#define TRELLIS_PINNING __uint(pinning, LIBBPF_PIN_BY_NAME);
#endif

/* 110 pods per node is the Kubernetes limit; the sandbox runs several
 * nodes on one kernel, but each node has its own pin directory. */
#define TRELLIS_MAX_ENDPOINTS 4096
#define TRELLIS_MAX_IPCACHE 262144
#define TRELLIS_MAX_POLICY 262144
#define TRELLIS_MAX_CT 262144
/* Fragmented datagrams in flight at once. */
#define TRELLIS_MAX_FRAGS 16384

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TRELLIS_MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct trellis_endpoint);
	TRELLIS_PINNING
} trellis_endpoints SEC(".maps");

/* LPM tries exist only without preallocation. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, TRELLIS_MAX_IPCACHE);
	__type(key, struct trellis_ipcache_key);
	__type(value, struct trellis_ipcache_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	TRELLIS_PINNING
} trellis_ipcache SEC(".maps");

/* Not preallocated: most nodes hold far fewer entries than the limit. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TRELLIS_MAX_POLICY);
	__type(key, struct trellis_policy_key);
	__type(value, struct trellis_policy_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	TRELLIS_PINNING
} trellis_policy SEC(".maps");

/* LRU: when full, the least recently used connection is forgotten instead
 * of a new one being refused (its next packet goes through policy again). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TRELLIS_MAX_CT);
	__type(key, struct trellis_ct_key);
	__type(value, struct trellis_ct_value);
	TRELLIS_PINNING
} trellis_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TRELLIS_MAX_FRAGS);
	__type(key, struct trellis_frag_key);
	__type(value, struct trellis_frag_value);
	TRELLIS_PINNING
} trellis_frags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TRELLIS_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
	TRELLIS_PINNING
} trellis_counters SEC(".maps");

#endif /* TRELLIS_MAPS_H */
