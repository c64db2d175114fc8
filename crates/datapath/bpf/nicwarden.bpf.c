// SPDX-License-Identifier: Apache-2.0
//
// nicwarden's eBPF datapath: a tc classifier (clsact egress, direct action) on the node's
// fabric interface. It decides per packet, from maps the agent writes, whether the packet may
// leave and which HTB class shapes it; HTB (installed by tc, see src/plan.rs) still shapes the
// rate. The Rust side is crates/datapath/src/ebpf/ (layout constants in maps.rs must match).
//
// Per packet:
//   * ARP: HTB class 1:2 (control), pass, not counted (only ARP passes outside the scopes,
//     as with the tc backend's filters);
//   * IPv4: the destination is looked up in the LPM trie `nw_dst` -> scope slot (a miss is
//     slot 0, the egress scope); IPv6 and any other protocol: slot 0 (like the tc backend's
//     catch-all filter), so a blocked egress blocks them too;
//   * slot config `nw_config`: mode BLOCKED (0, also an unwritten slot: fail closed) drops and
//     counts; mode LEASE (1) charges the packet to the slot's exact volume counter `nw_used`
//     and drops it if it would cross `volume_limit`; LEASE and FLOOR (2) then count the packet
//     as passed and steer it to the slot's HTB class through skb->priority (HTB's classify
//     honours a priority naming one of its leaf classes; a class that does not exist falls to
//     HTB's default class, which drops: fail closed).
//
// Lengths are IP packet lengths (IPv4 total length; for IPv6, for an IPv4 header whose total
// length is 0 as with BIG TCP, and for non-IP frames: skb->len minus the Ethernet header), so
// the figures match the nftables backend, which counts IP bytes. A GSO super-packet is one
// packet of its full length, as in nftables.
//
// Lookup cost does not depend on the number of scopes: one LPM lookup (bounded by the 32
// bits of an address) and three array lookups.

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// Keep in sync with src/ebpf/maps.rs.
#define NW_SLOTS 1024
#define NW_DST_MAX 65536

#define NW_MODE_BLOCKED 0
#define NW_MODE_LEASE 1
#define NW_MODE_FLOOR 2

// HTB class 1:2, the control class of the tc layout.
#define NW_CONTROL_CLASSID 0x00010002

struct nw_dst_key {
	__u32 prefixlen;
	__u32 addr; // network byte order
};

struct nw_config {
	__u32 mode;
	__u32 classid;
	__u64 lease_id;
	__u64 volume_limit;
};

struct nw_stats {
	__u64 bytes;
	__u64 packets;
	__u64 volume_drops;
	__u64 blocked_drops;
};

struct nw_used {
	__u64 used;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, NW_DST_MAX);
	__type(key, struct nw_dst_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nw_dst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NW_SLOTS);
	__type(key, __u32);
	__type(value, struct nw_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nw_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NW_SLOTS);
	__type(key, __u32);
	__type(value, struct nw_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nw_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NW_SLOTS);
	__type(key, __u32);
	__type(value, struct nw_used);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nw_used SEC(".maps");

// The part of the IPv4 header we read.
struct nw_ipv4 {
	__u8 version_ihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__be16 check;
	__be32 saddr;
	__be32 daddr;
};

SEC("classifier")
int nw_egress(struct __sk_buff *skb)
{
	__u32 slot = 0;
	__u64 len = skb->len > ETH_HLEN ? skb->len - ETH_HLEN : 0;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct nw_ipv4 ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) == 0) {
			struct nw_dst_key key = { .prefixlen = 32, .addr = ip.daddr };
			__u32 *found = bpf_map_lookup_elem(&nw_dst, &key);
			__u16 tot_len = bpf_ntohs(ip.tot_len);
			if (found)
				slot = *found;
			if (tot_len != 0)
				len = tot_len;
		}
	} else if (skb->protocol == bpf_htons(ETH_P_ARP)) {
		skb->priority = NW_CONTROL_CLASSID;
		return TC_ACT_OK;
	}

	struct nw_config *cfg = bpf_map_lookup_elem(&nw_config, &slot);
	struct nw_stats *stats = bpf_map_lookup_elem(&nw_stats, &slot);
	if (!cfg || !stats)
		return TC_ACT_SHOT; // a slot outside the maps: fail closed

	if (cfg->mode == NW_MODE_LEASE) {
		struct nw_used *used = bpf_map_lookup_elem(&nw_used, &slot);
		if (!used)
			return TC_ACT_SHOT;
		// Exact across CPUs: reserve the bytes, give them back if they do not fit. Nothing
		// beyond the limit ever passes; two packets racing at the very edge may both be
		// dropped where one would have fitted (fail closed).
		__u64 old = __sync_fetch_and_add(&used->used, len);
		if (old + len > cfg->volume_limit) {
			__sync_fetch_and_add(&used->used, -len);
			stats->volume_drops += 1;
			return TC_ACT_SHOT;
		}
	} else if (cfg->mode != NW_MODE_FLOOR) {
		// NW_MODE_BLOCKED, and any unknown mode: fail closed.
		stats->blocked_drops += 1;
		return TC_ACT_SHOT;
	}

	// Per-CPU values; tc runs with bottom halves disabled, so no other program instance
	// touches this CPU's copy meanwhile.
	stats->bytes += len;
	stats->packets += 1;
	skb->priority = cfg->classid;
	return TC_ACT_OK;
}

// Ingress policing (later) goes here as a second program, SEC("classifier") nw_ingress,
// attached at clsact ingress, keyed by source address, with per-direction config and
// counters.

// No GPL-only helpers are used.
char LICENSE[] SEC("license") = "Apache-2.0";
