//! The enforcement variants the benchmarks compare, each an install/remove pair on a node's
//! fabric interface.
//!
//! A variant installs either a lease ([`Variant::install`]: `bench backends`, `bench volume`)
//! or a chain of per-peer scopes ([`Variant::install_scopes`]: `bench scale`). The variants
//! that are datapath backends of the agent ([`Variant::datapath`]) are also the ones `bench
//! volume` and `bench latency` drive through [`Datapath::reconcile`].
//!
//! The eBPF backend pins its maps under a directory of this run ([`bench_pin_dir`], named
//! after the node's namespace); removing the variant removes it. For `bench scale` it holds
//! N destinations in its LPM map, looked up once per packet: a flat lookup, not a chain.

use anyhow::Context as _;
use nicwarden_datapath::{
    BpfOps, Datapath, EbpfDatapath, LinuxDatapath, NftOps, RealBpf, RealNft, RealTc, TcOps,
};
use nicwarden_testbed::Node;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use super::{default_burst, lease_state};

/// A lease as the variants install it: egress, rate, optional volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: u64,
    pub rate_bps: u64,
    pub volume: Option<u64>,
}

/// An enforcement variant on node1's fabric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Nothing installed: the reference.
    Unenforced,
    /// The agent's `tc` backend (`LinuxDatapath`: HTB + u32 filters + nftables accounting).
    Tc,
    /// Only the nftables accounting table of the `tc` backend (quota and counters on
    /// oifname), no HTB: what the accounting alone costs.
    Nftables,
    /// The agent's `ebpf` backend (`EbpfDatapath`: the tc programs + HTB, no filters).
    Ebpf,
}

/// Every variant, in the order the benchmarks measure and print them.
pub const VARIANTS: &[Variant] = &[
    Variant::Unenforced,
    Variant::Tc,
    Variant::Nftables,
    Variant::Ebpf,
];

/// The variants that are datapath backends of the agent (today `tc`).
pub fn backends(node: &Node) -> Vec<Variant> {
    VARIANTS
        .iter()
        .copied()
        .filter(|v| v.datapath(node).is_some())
        .collect()
}

/// [`VARIANTS`] rotated left by `rep`: each repetition starts with another variant.
pub fn rotated(rep: u64) -> Vec<Variant> {
    let mut v = VARIANTS.to_vec();
    let len = v.len() as u64;
    if len > 0 {
        v.rotate_left((rep % len) as usize);
    }
    v
}

/// The table the `nftables` variant and `bench scale` install: the datapath's own
/// (`inet nicwarden`), so what they measure is what the agent's accounting costs.
const NFT_TABLE: &str = "inet nicwarden";
/// The `over` of a quota without a volume: never fires (the datapath's `UNLIMITED_VOLUME`).
const NFT_UNLIMITED: u64 = nicwarden_datapath::plan::UNLIMITED_VOLUME;
/// Filter priority of `bench scale`'s first scope; scope i has priority 100 + i (the
/// agent's layout: `PEER_PREF_BASE` + i, one priority per peer scope), so the kernel walks
/// one classifier per scope, in order.
const SCOPE_PREF_BASE: u32 = 100;
/// HTB class all of `bench scale`'s scopes go to (the agent's egress minor).
const SCOPE_CLASS: &str = "1:10";
/// A rate far above what veth carries here, so a lease or class at it never binds.
pub const NON_BINDING_BPS: u64 = 100_000_000_000;

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Unenforced => "unenforced",
            Variant::Tc => "tc",
            Variant::Nftables => "nftables",
            Variant::Ebpf => "ebpf",
        }
    }

    /// The agent's datapath backend behind this variant, programming `node`'s fabric; `None`
    /// for the reference and for the `nftables` ablation.
    pub fn datapath(self, node: &Node) -> Option<Box<dyn Datapath>> {
        match self {
            Variant::Tc => Some(Box::new(LinuxDatapath::in_netns(
                node.netns.name(),
                &node.fabric_iface,
            ))),
            Variant::Ebpf => Some(Box::new(EbpfDatapath::in_netns(
                node.netns.name(),
                &node.fabric_iface,
                &bench_pin_dir(node),
            ))),
            Variant::Unenforced | Variant::Nftables => None,
        }
    }

    /// Installs `lease` on `node`'s fabric as this variant enforces it.
    pub fn install(self, node: &Node, lease: Lease) -> anyhow::Result<Installed> {
        let what = || format!("install the {} variant on {}", self.name(), node.name);
        match (self, self.datapath(node)) {
            (_, Some(mut dp)) => {
                dp.reconcile(&lease_state(lease.id, lease.rate_bps, lease.volume))
                    .with_context(what)?;
                Ok(Installed::Datapath(dp))
            }
            (Variant::Nftables, None) => {
                nft(node, &accounting_table(&node.fabric_iface, lease)).with_context(what)?;
                Ok(Installed::Nft(node.clone()))
            }
            (_, None) => Ok(Installed::Nothing),
        }
    }

    /// Installs `scopes` per-peer scopes on `node`'s fabric, the last of which matches
    /// `target` (the others distinct /32s from 198.18.128.0/17, which no node uses), so that
    /// traffic to `target` walks the whole chain. `None`: the variant has no such layout.
    pub fn install_scopes(
        self,
        node: &Node,
        scopes: u32,
        target: Ipv4Addr,
    ) -> anyhow::Result<Option<Installed>> {
        let what = || format!("install {scopes} {} scopes on {}", self.name(), node.name);
        let dsts = scope_destinations(scopes, target);
        match self {
            Variant::Ebpf => {
                // The backend with a non-binding egress lease (slot 0), then the N
                // destinations into its LPM map, all to that slot.
                let mut dp = self
                    .datapath(node)
                    .context("the ebpf variant is a datapath")?;
                dp.reconcile(&lease_state(1, NON_BINDING_BPS, None))
                    .with_context(what)?;
                let mut bpf = RealBpf::new();
                bpf.open(&bench_pin_dir(node)).with_context(what)?;
                for d in &dsts {
                    let net = ipnet::Ipv4Net::new(*d, 32).context("a /32")?;
                    bpf.set_destination(net, 0).with_context(what)?;
                }
                Ok(Some(Installed::Datapath(dp)))
            }
            Variant::Unenforced => Ok(Some(Installed::Nothing)),
            Variant::Tc => {
                tc(node, &u32_chain(&node.fabric_iface, &dsts)).with_context(what)?;
                Ok(Some(Installed::Tc(node.clone())))
            }
            Variant::Nftables => {
                nft(node, &daddr_chain(&node.fabric_iface, &dsts)).with_context(what)?;
                Ok(Some(Installed::Nft(node.clone())))
            }
        }
    }
}

/// Where the `ebpf` variant pins its maps on `node`: one directory per run and node.
pub fn bench_pin_dir(node: &Node) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/nicwarden-bench").join(node.netns.name())
}

/// What a variant installed, to be removed with [`Installed::remove`].
pub enum Installed {
    Nothing,
    /// A datapath backend holding its lease.
    Datapath(Box<dyn Datapath>),
    /// `bench scale`'s tc tree on the node's fabric.
    Tc(Node),
    /// Our nftables table on the node.
    Nft(Node),
}

impl Installed {
    /// The datapath backend, to change its lease.
    pub fn datapath(&mut self) -> Option<&mut (dyn Datapath + 'static)> {
        match self {
            Installed::Datapath(dp) => Some(dp.as_mut()),
            _ => None,
        }
    }

    /// Runs `f` while this is installed, then removes it, also when `f` failed (`f`'s error
    /// is the one returned then).
    pub fn during<T>(
        mut self,
        f: impl FnOnce(&mut Installed) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let result = f(&mut self);
        let removed = self.remove();
        let t = result?;
        removed?;
        Ok(t)
    }

    fn remove(self) -> anyhow::Result<()> {
        match self {
            Installed::Nothing => Ok(()),
            Installed::Datapath(mut dp) => dp.remove().context("remove the datapath state"),
            Installed::Tc(node) => tc(
                &node,
                &[format!("qdisc del dev {} root", node.fabric_iface)],
            )
            .with_context(|| format!("remove the tc tree on {}", node.name)),
            Installed::Nft(node) => nft(&node, &format!("delete table {NFT_TABLE}\n"))
                .with_context(|| format!("remove table {NFT_TABLE} on {}", node.name)),
        }
    }
}

/// Applies an nftables script in `node`'s namespace with `nft -f` (one atomic transaction),
/// through the datapath's own tool runner.
fn nft(node: &Node, script: &str) -> anyhow::Result<()> {
    RealNft::in_netns(node.netns.name())
        .apply(script)
        .map_err(anyhow::Error::from)
}

/// Runs tc commands in `node`'s namespace with `tc -batch`, through the datapath's own tool
/// runner.
fn tc(node: &Node, cmds: &[String]) -> anyhow::Result<()> {
    RealTc::in_netns(node.netns.name())
        .batch(cmds)
        .map_err(anyhow::Error::from)
}

/// Table `inet nicwarden` with a postrouting chain of `rules`, after `objects` (named
/// quotas and counters). Mirrors the layout of crates/datapath/src/nft.rs (same table, chain,
/// hook, priority and policy), so the benchmarks' nftables variants cost what the agent's
/// table costs.
fn nft_table(objects: &[String], rules: &[String]) -> String {
    let mut s = format!("table {NFT_TABLE} {{\n");
    for o in objects {
        let _ = writeln!(s, "\t{o}");
    }
    s.push_str(
        "\tchain postrouting {\n\t\ttype filter hook postrouting priority 0; policy accept;\n",
    );
    for r in rules {
        let _ = writeln!(s, "\t\t{r}");
    }
    s.push_str("\t}\n}\n");
    s
}

/// The nftables half of the `tc` backend for one egress lease, as the datapath writes it:
/// quota `qL` (the volume, or never firing), counters `dL` (volume drops) and `pL` (passed).
fn accounting_table(iface: &str, lease: Lease) -> String {
    let id = lease.id;
    nft_table(
        &[
            format!(
                "quota q{id} {{ over {} bytes }}",
                lease.volume.unwrap_or(NFT_UNLIMITED)
            ),
            format!("counter d{id} {{ }}"),
            format!("counter p{id} {{ }}"),
        ],
        &[
            format!("oifname \"{iface}\" quota name \"q{id}\" counter name \"d{id}\" drop"),
            format!("oifname \"{iface}\" counter name \"p{id}\" accept"),
        ],
    )
}

/// `scopes` destinations: distinct /32s from 198.18.128.0/17, then `target` last.
fn scope_destinations(scopes: u32, target: Ipv4Addr) -> Vec<Ipv4Addr> {
    let base = u32::from(Ipv4Addr::new(198, 18, 128, 0));
    (1..scopes)
        .map(|i| Ipv4Addr::from(base + i))
        .chain([target])
        .collect()
}

/// One rule per destination, `oifname IFACE ip daddr X counter accept`, in order.
fn daddr_chain(iface: &str, dsts: &[Ipv4Addr]) -> String {
    let rules: Vec<String> = dsts
        .iter()
        .map(|d| format!("oifname \"{iface}\" ip daddr {d} counter accept"))
        .collect();
    nft_table(&[], &rules)
}

/// The agent's HTB layout (root with a dropping default class, ARP class) and one u32 filter
/// per destination, in order, all to one class whose rate never binds.
fn u32_chain(dev: &str, dsts: &[Ipv4Addr]) -> Vec<String> {
    let burst = default_burst(NON_BINDING_BPS);
    let mut cmds = vec![
        format!("qdisc add dev {dev} root handle 1: htb default 3 direct_qlen 0"),
        format!("class add dev {dev} parent 1: classid 1:2 htb rate 1mbit ceil 1mbit"),
        format!("filter add dev {dev} parent 1: protocol arp pref 1 handle ::1 u32 match u32 0 0 classid 1:2"),
        format!("class add dev {dev} parent 1: classid 1:3 htb rate 8bit ceil 8bit"),
        format!("qdisc add dev {dev} parent 1:3 handle 3: pfifo limit 0"),
        format!(
            "class add dev {dev} parent 1: classid {SCOPE_CLASS} htb rate {r}bit ceil {r}bit burst {burst} cburst {burst} quantum 200000",
            r = NON_BINDING_BPS
        ),
        format!("qdisc add dev {dev} parent {SCOPE_CLASS} handle 10: pfifo limit 1000"),
    ];
    for (i, d) in (0u32..).zip(dsts) {
        cmds.push(format!(
            "filter add dev {dev} parent 1: protocol ip pref {} handle ::1 u32 match ip dst {d}/32 classid {SCOPE_CLASS}",
            SCOPE_PREF_BASE + i
        ));
    }
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_repetition_starts_with_another_variant() {
        let firsts: Vec<Variant> = (0..VARIANTS.len() as u64).map(|r| rotated(r)[0]).collect();
        assert_eq!(firsts, VARIANTS);
        assert_eq!(rotated(VARIANTS.len() as u64), VARIANTS);
    }

    #[test]
    fn destinations_end_with_the_target() {
        let t = Ipv4Addr::new(198, 18, 0, 2);
        assert_eq!(scope_destinations(1, t), vec![t]);
        let d = scope_destinations(3, t);
        assert_eq!(
            d,
            vec![
                Ipv4Addr::new(198, 18, 128, 1),
                Ipv4Addr::new(198, 18, 128, 2),
                t
            ]
        );
        let many = scope_destinations(30_000, t);
        let set: std::collections::BTreeSet<_> = many.iter().collect();
        assert_eq!(set.len(), 30_000);
        assert!(many[..29_999].iter().all(|a| "198.18.128.0/17"
            .parse::<ipnet::Ipv4Net>()
            .is_ok_and(|n| n.contains(a))));
    }

    #[test]
    fn one_u32_filter_priority_per_scope_in_order() {
        let t = Ipv4Addr::new(198, 18, 0, 2);
        let cmds = u32_chain("fab0", &scope_destinations(2001, t));
        let filters: Vec<&String> = cmds.iter().filter(|c| c.contains("protocol ip")).collect();
        assert_eq!(filters.len(), 2001);
        assert!(filters[0].contains("pref 100 handle ::1 u32 match ip dst 198.18.128.1/32"));
        assert!(filters[1999].contains("pref 2099 handle ::1 "));
        // The target is the last priority: every packet to it walks them all.
        assert_eq!(
            filters[2000].as_str(),
            "filter add dev fab0 parent 1: protocol ip pref 2100 handle ::1 u32 match ip dst 198.18.0.2/32 classid 1:10"
        );
    }

    #[test]
    fn nft_tables_mirror_the_datapath_layout() {
        let lease = Lease {
            id: 7,
            rate_bps: 1,
            volume: Some(10_000_000),
        };
        assert_eq!(
            accounting_table("fab0", lease),
            "table inet nicwarden {\n\
             \tquota q7 { over 10000000 bytes }\n\
             \tcounter d7 { }\n\
             \tcounter p7 { }\n\
             \tchain postrouting {\n\
             \t\ttype filter hook postrouting priority 0; policy accept;\n\
             \t\toifname \"fab0\" quota name \"q7\" counter name \"d7\" drop\n\
             \t\toifname \"fab0\" counter name \"p7\" accept\n\
             \t}\n}\n"
        );
        let chain = daddr_chain("fab0", &scope_destinations(2, Ipv4Addr::new(198, 18, 0, 2)));
        assert!(chain.ends_with(
            "\t\toifname \"fab0\" ip daddr 198.18.128.1 counter accept\n\
             \t\toifname \"fab0\" ip daddr 198.18.0.2 counter accept\n\t}\n}\n"
        ));
    }
}
