//! The spec's ADD result, built from trellis-node's endpoint record, and the
//! runtime's `prevResult`, parsed back for CHECK and chained ADD.
//!
//! ```text
//!  proto::Endpoint ──from_endpoint()──▶ CniResult ──for_version(0.4.0|1.0.0|1.1.0)──▶ stdout
//!  prevResult JSON ──parse_prev()─────▶ CniResult ──compare(&Endpoint)──▶ ok | code 101
//! ```
//!
//! One set of serde types holds every field any supported version has; the
//! version decides which are printed (0.4.0: `ips[].version`; 1.1.0:
//! `interfaces[].mtu/socketPath/pciID`, `routes[].mtu/advmss/priority/table/scope`).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::config::CniVersion;
use crate::error::Error;
use crate::proto::Endpoint;

/// The spec's "ADD Success" result.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_version: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub interfaces: Vec<Interface>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub ips: Vec<IpConfig>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub routes: Vec<Route>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub dns: Dns,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// 1.1.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for interfaces in the pod; absent for host ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// 1.1.0 only.
    #[serde(
        default,
        rename = "socketPath",
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    /// 1.1.0 only.
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// 0.4.0 only: "4" or "6".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub address: IpNet,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "empty_as_none"
    )]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "empty_as_none"
    )]
    pub gw: Option<IpAddr>,
    /// This and the rest: 1.1.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Dns {
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub search: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub options: Vec<String>,
}

/// Go marshals a nil slice as `null` when a field lacks `omitempty`.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Go's `net.IP` unmarshals `""` as no address.
fn empty_as_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => s.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

/// Index of the pod's interface in [`from_endpoint`]'s result (the host
/// veth is 0).
pub const POD_INTERFACE: usize = 1;

/// The result for a new endpoint, with every field any version may print.
pub fn from_endpoint(ep: &Endpoint) -> CniResult {
    let interfaces = vec![
        Interface {
            name: ep.host_ifname.clone(),
            mac: Some(ep.host_mac.clone()),
            ..Interface::default()
        },
        Interface {
            name: ep.attachment.ifname.clone(),
            mac: Some(ep.mac.clone()),
            mtu: Some(ep.mtu),
            sandbox: Some(ep.netns.clone()),
            ..Interface::default()
        },
    ];
    let ips = ep
        .addresses
        .iter()
        .map(|address| IpConfig {
            version: None,
            address: *address,
            gateway: Some(Endpoint::gateway(address)),
            interface: Some(POD_INTERFACE),
        })
        .collect();
    let mut routes = Vec::new();
    let default_v4 = IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0));
    let default_v6 = IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 0));
    for default in [default_v4, default_v6] {
        if let Some(address) = ep
            .addresses
            .iter()
            .find(|a| a.addr().is_ipv4() == default.addr().is_ipv4())
        {
            routes.push(Route {
                dst: default,
                gw: Some(Endpoint::gateway(address)),
                mtu: None,
                advmss: None,
                priority: None,
                table: None,
                scope: None,
            });
        }
    }
    CniResult {
        cni_version: None,
        interfaces,
        ips,
        routes,
        dns: Dns::default(),
    }
}

impl CniResult {
    /// The result as `version` prints it: `cniVersion` set, fields the
    /// version lacks removed, 0.4.0's `ips[].version` filled in.
    pub fn for_version(mut self, version: CniVersion) -> CniResult {
        self.cni_version = Some(version.to_string());
        if version < CniVersion::V1_1_0 {
            for i in &mut self.interfaces {
                i.mtu = None;
                i.socket_path = None;
                i.pci_id = None;
            }
            for r in &mut self.routes {
                r.mtu = None;
                r.advmss = None;
                r.priority = None;
                r.table = None;
                r.scope = None;
            }
        }
        for ip in &mut self.ips {
            ip.version = (version == CniVersion::V0_4_0).then(|| {
                match ip.address {
                    IpNet::V4(_) => "4",
                    IpNet::V6(_) => "6",
                }
                .to_string()
            });
        }
        self
    }

    /// The result as one line of JSON.
    pub fn to_json(&self) -> Result<String, Error> {
        serde_json::to_string(self).map_err(|e| Error::Protocol {
            problem: format!("cannot encode the result: {e}"),
        })
    }

    /// ADD with a `prevResult` (trellis chained after another plugin): the
    /// previous result with ours appended, interface indexes shifted.
    pub fn append_to(self, mut prev: CniResult) -> CniResult {
        let offset = prev.interfaces.len();
        prev.interfaces.extend(self.interfaces);
        prev.ips.extend(self.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i.saturating_add(offset));
            ip
        }));
        prev.routes.extend(self.routes);
        prev
    }
}

/// The runtime's `prevResult` in any supported version's format (code 7
/// when it is not a CNI result).
pub fn parse_prev(prev: &Value) -> Result<CniResult, Error> {
    CniResult::deserialize(prev).map_err(|e| Error::InvalidConfig {
        field: "prevResult".into(),
        problem: format!("not a CNI result: {e}"),
    })
}

/// CHECK: the pod interface and addresses in `prev` against the endpoint
/// trellis-node verified in the kernel. Routes are not compared: the spec
/// lets later chained plugins change them.
pub fn compare(prev: &CniResult, ep: &Endpoint) -> Result<(), Error> {
    let ifname = &ep.attachment.ifname;
    let Some((index, iface)) =
        prev.interfaces.iter().enumerate().find(|(_, i)| {
            &i.name == ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty())
        })
    else {
        return Err(Error::Mismatch {
            what: format!("prevResult has no interface {ifname:?} in a sandbox"),
        });
    };
    let mut diffs = Vec::new();
    if let Some(mac) = &iface.mac
        && !mac.eq_ignore_ascii_case(&ep.mac)
    {
        diffs.push(format!(
            "{ifname} has MAC {mac} in prevResult but {} in the endpoint",
            ep.mac
        ));
    }
    if let Some(sandbox) = &iface.sandbox
        && sandbox != &ep.netns
    {
        diffs.push(format!(
            "{ifname} is in sandbox {sandbox} in prevResult but the endpoint's netns is {}",
            ep.netns
        ));
    }
    // IPs without an interface index are taken as the pod's too.
    let prev_addrs: BTreeSet<IpNet> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none_or(|i| i == index))
        .map(|ip| ip.address)
        .collect();
    let ep_addrs: BTreeSet<IpNet> = ep.addresses.iter().copied().collect();
    if prev_addrs != ep_addrs {
        diffs.push(format!(
            "{ifname} has addresses [{}] in prevResult but [{}] in the endpoint",
            join(&prev_addrs),
            join(&ep_addrs)
        ));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Error::Mismatch {
            what: diffs.join("; "),
        })
    }
}

fn join(addrs: &BTreeSet<IpNet>) -> String {
    addrs
        .iter()
        .map(IpNet::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::proto::Attachment;
    use serde_json::json;

    pub(crate) fn mk_endpoint(addresses: &[&str]) -> Endpoint {
        Endpoint {
            attachment: Attachment {
                container_id: "abc123".into(),
                ifname: "eth0".into(),
            },
            netns: "/var/run/netns/cni-1234".into(),
            host_ifname: "trellis1a2b3c4d".into(),
            host_mac: "02:00:00:aa:bb:01".into(),
            mac: "02:00:00:aa:bb:02".into(),
            mtu: 1450,
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            pod: None,
        }
    }

    fn render(ep: &Endpoint, v: CniVersion) -> Value {
        serde_json::from_str(&from_endpoint(ep).for_version(v).to_json().unwrap()).unwrap()
    }

    #[test]
    fn result_0_4_0_has_ip_versions_and_no_mtu() {
        let ep = mk_endpoint(&["10.244.1.5/32"]);
        assert_eq!(
            render(&ep, CniVersion::V0_4_0),
            json!({
                "cniVersion": "0.4.0",
                "interfaces": [
                    {"name": "trellis1a2b3c4d", "mac": "02:00:00:aa:bb:01"},
                    {"name": "eth0", "mac": "02:00:00:aa:bb:02", "sandbox": "/var/run/netns/cni-1234"}
                ],
                "ips": [
                    {"version": "4", "address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1}
                ],
                "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
                "dns": {}
            })
        );
    }

    #[test]
    fn result_1_0_0_has_no_ip_versions_and_no_mtu() {
        let ep = mk_endpoint(&["10.244.1.5/32", "fd00:10:244:1::5/128"]);
        assert_eq!(
            render(&ep, CniVersion::V1_0_0),
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "trellis1a2b3c4d", "mac": "02:00:00:aa:bb:01"},
                    {"name": "eth0", "mac": "02:00:00:aa:bb:02", "sandbox": "/var/run/netns/cni-1234"}
                ],
                "ips": [
                    {"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1},
                    {"address": "fd00:10:244:1::5/128", "gateway": "fe80::1", "interface": 1}
                ],
                "routes": [
                    {"dst": "0.0.0.0/0", "gw": "169.254.1.1"},
                    {"dst": "::/0", "gw": "fe80::1"}
                ],
                "dns": {}
            })
        );
    }

    #[test]
    fn result_1_1_0_has_the_pod_interface_mtu() {
        let ep = mk_endpoint(&["10.244.1.5/32"]);
        assert_eq!(
            render(&ep, CniVersion::V1_1_0),
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "trellis1a2b3c4d", "mac": "02:00:00:aa:bb:01"},
                    {"name": "eth0", "mac": "02:00:00:aa:bb:02", "mtu": 1450,
                     "sandbox": "/var/run/netns/cni-1234"}
                ],
                "ips": [{"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
                "dns": {}
            })
        );
    }

    #[test]
    fn an_ipv6_only_endpoint_gets_only_the_ipv6_default_route() {
        let v = render(&mk_endpoint(&["fd00::5/128"]), CniVersion::V0_4_0);
        assert_eq!(v["routes"], json!([{"dst": "::/0", "gw": "fe80::1"}]));
        assert_eq!(v["ips"][0]["version"], "6");
    }

    /// The spec's 0.4.0 example result, as a runtime caches and replays it.
    const PREV_0_4_0: &str = r#"{
        "cniVersion": "0.4.0",
        "interfaces": [
            {"name": "trellis1a2b3c4d", "mac": "02:00:00:aa:bb:01"},
            {"name": "eth0", "mac": "02:00:00:AA:BB:02", "sandbox": "/var/run/netns/cni-1234"}
        ],
        "ips": [{"version": "4", "address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
    }"#;

    /// A 1.0.0 result as libcni's Go types marshal it (null lists included).
    const PREV_1_0_0: &str = r#"{
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "trellis1a2b3c4d", "mac": "02:00:00:aa:bb:01"},
            {"name": "eth0", "mac": "02:00:00:aa:bb:02", "sandbox": "/var/run/netns/cni-1234"}
        ],
        "ips": [
            {"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1},
            {"address": "fd00::5/128", "gateway": "", "interface": 1}
        ],
        "routes": null,
        "dns": {}
    }"#;

    #[test]
    fn parses_prev_results_of_every_version() {
        let v4 = parse_prev(&serde_json::from_str(PREV_0_4_0).unwrap()).unwrap();
        assert_eq!(v4.cni_version.as_deref(), Some("0.4.0"));
        assert_eq!(v4.interfaces.len(), 2);
        assert_eq!(v4.ips[0].version.as_deref(), Some("4"));
        assert_eq!(v4.ips[0].interface, Some(1));
        assert_eq!(v4.dns.nameservers, vec!["10.96.0.10".to_string()]);
        let v1 = parse_prev(&serde_json::from_str(PREV_1_0_0).unwrap()).unwrap();
        assert_eq!(v1.ips[1].gateway, None);
        assert!(v1.routes.is_empty());
        // Our own 1.1.0 output parses back to itself.
        let ours = from_endpoint(&mk_endpoint(&["10.244.1.5/32"])).for_version(CniVersion::V1_1_0);
        let back = parse_prev(&serde_json::to_value(&ours).unwrap()).unwrap();
        assert_eq!(back, ours);
    }

    #[test]
    fn malformed_prev_results_are_code_7() {
        for bad in [
            json!({"ips": [{"address": "10.0.0.1"}]}),
            json!({"ips": [{"address": "10.0.0.1/32", "interface": -1}]}),
            json!({"interfaces": [{"mac": "x"}]}),
            json!({"routes": [{"dst": "0.0.0.0/0", "gw": "nope"}]}),
        ] {
            let e = parse_prev(&bad).unwrap_err();
            assert_eq!(e.code(), 7, "{bad}");
            assert!(
                e.to_string()
                    .starts_with("invalid network configuration: prevResult: not a CNI result")
            );
        }
    }

    #[test]
    fn check_accepts_a_matching_prev_result_of_any_version() {
        let prev = parse_prev(&serde_json::from_str(PREV_0_4_0).unwrap()).unwrap();
        compare(&prev, &mk_endpoint(&["10.244.1.5/32"])).unwrap();
        let prev = parse_prev(&serde_json::from_str(PREV_1_0_0).unwrap()).unwrap();
        compare(&prev, &mk_endpoint(&["fd00::5/128", "10.244.1.5/32"])).unwrap();
    }

    #[test]
    fn check_reports_what_differs_as_code_101() {
        let prev = parse_prev(&serde_json::from_str(PREV_0_4_0).unwrap()).unwrap();
        let mut ep = mk_endpoint(&["10.244.1.6/32"]);
        ep.mac = "02:00:00:aa:bb:ff".into();
        ep.netns = "/var/run/netns/other".into();
        let e = compare(&prev, &ep).unwrap_err();
        assert_eq!(e.code(), 101);
        assert_eq!(
            e.to_string(),
            "the pod's endpoint differs from prevResult: eth0 has MAC 02:00:00:AA:BB:02 in \
             prevResult but 02:00:00:aa:bb:ff in the endpoint; eth0 is in sandbox \
             /var/run/netns/cni-1234 in prevResult but the endpoint's netns is \
             /var/run/netns/other; eth0 has addresses [10.244.1.5/32] in prevResult but \
             [10.244.1.6/32] in the endpoint"
        );
        let mut ep = mk_endpoint(&["10.244.1.5/32"]);
        ep.attachment.ifname = "net1".into();
        assert_eq!(
            compare(&prev, &ep).unwrap_err().to_string(),
            "the pod's endpoint differs from prevResult: prevResult has no interface \"net1\" in a sandbox"
        );
    }

    #[test]
    fn chained_add_appends_to_the_previous_result() {
        let prev: CniResult = serde_json::from_value(json!({
            "interfaces": [{"name": "dummy0"}],
            "ips": [{"address": "192.168.0.2/24", "interface": 0}],
            "dns": {"nameservers": ["1.1.1.1"]}
        }))
        .unwrap();
        let ours = from_endpoint(&mk_endpoint(&["10.244.1.5/32"]));
        let merged = ours.append_to(prev).for_version(CniVersion::V1_0_0);
        assert_eq!(merged.interfaces.len(), 3);
        assert_eq!(merged.ips[0].interface, Some(0));
        assert_eq!(merged.ips[1].interface, Some(2));
        assert_eq!(merged.dns.nameservers, vec!["1.1.1.1".to_string()]);
        // The shifted index still points at eth0, so CHECK finds its address.
        compare(&merged, &mk_endpoint(&["10.244.1.5/32"])).unwrap();
    }
}
