// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * xskvm's XDP program: a frame received on queue i goes to the AF_XDP
 * socket in xsks_map[i] if the guest should see it; a frame on a queue
 * without a socket goes on to the kernel stack (the XDP_PASS fallback of
 * bpf_redirect_map), so the host keeps working on the queues xskvm does
 * not own.
 *
 * Which frames the guest sees (rx_filter, set by the loader before any
 * socket enters xsks_map, and again whenever the guest changes its
 * receive mode):
 * unicast to its MAC, broadcast, multicast (all of it, or only what its
 * MAC table lists), and in promiscuous mode everything. Frames it should
 * not see pass to the host stack and are counted in filtered_frames.
 * While rx_filter is not enabled, every frame is redirected.
 *
 * The map sizes are set by the loader before load (one slot per device
 * queue); the values here are only the defaults.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

/* Keep in sync with RxFilterConfig in net-afxdp/src/program.rs. */
struct rx_filter_config {
	__u8 mac[6];
	__u8 enabled;
	__u8 promisc;
	__u8 all_multi;
	/* 1: multicast only for the addresses in mac_table. */
	__u8 multicast_by_table;
	__u8 pad[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rx_filter_config);
} rx_filter SEC(".maps");

/* Extra addresses the guest asked for (VIRTIO_NET_CTRL_MAC_TABLE_SET):
 * the MAC in the low 48 bits of the key, first byte lowest. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u8);
} mac_table SEC(".maps");

/* Frames kept from the guest by rx_filter, per receive queue. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u64);
} filtered_frames SEC(".maps");

static __always_inline int is_for_guest(const __u8 *dst,
					const struct rx_filter_config *cfg)
{
	__u64 key = 0;
	int i;

	if (!cfg->enabled || cfg->promisc)
		return 1;
	if (dst[0] & 1) {
		/* Broadcast is multicast with every bit set. */
		if ((dst[0] & dst[1] & dst[2] & dst[3] & dst[4] & dst[5]) == 0xff)
			return 1;
		if (cfg->all_multi || !cfg->multicast_by_table)
			return 1;
	} else if (dst[0] == cfg->mac[0] && dst[1] == cfg->mac[1] &&
		   dst[2] == cfg->mac[2] && dst[3] == cfg->mac[3] &&
		   dst[4] == cfg->mac[4] && dst[5] == cfg->mac[5]) {
		return 1;
	}
#pragma unroll
	for (i = 0; i < 6; i++)
		key |= (__u64)dst[i] << (8 * i);
	return bpf_map_lookup_elem(&mac_table, &key) != 0;
}

static __always_inline int redirect(struct xdp_md *ctx)
{
	const __u8 *data = (const __u8 *)(long)ctx->data;
	const __u8 *end = (const __u8 *)(long)ctx->data_end;
	__u32 zero = 0, queue = ctx->rx_queue_index;
	struct rx_filter_config *cfg;
	__u64 *filtered;

	cfg = bpf_map_lookup_elem(&rx_filter, &zero);
	if (cfg && cfg->enabled && data + ETH_HLEN <= end &&
	    !is_for_guest(data, cfg)) {
		filtered = bpf_map_lookup_elem(&filtered_frames, &queue);
		if (filtered)
			*filtered += 1;
		return XDP_PASS;
	}
	return bpf_redirect_map(&xsks_map, queue, XDP_PASS);
}

/* One buffer per frame: for sockets without multi-buffer. Drivers then
 * keep frames linear (veth refuses native mode above ~3.5 KB MTU, and
 * generic XDP linearizes), so no frame reaches a socket in pieces it
 * cannot take. */
SEC("xdp")
int xskvm_redirect(struct xdp_md *ctx)
{
	return redirect(ctx);
}

/* Frames may come in several buffers ("xdp.frags"; the Ethernet header is
 * always in the first): for multi-buffer sockets (XDP_USE_SG), so drivers
 * accept it on interfaces whose MTU exceeds a page. Only one of the two is
 * loaded. */
SEC("xdp.frags")
int xskvm_redirect_frags(struct xdp_md *ctx)
{
	return redirect(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
