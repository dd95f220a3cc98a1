//! The endpoint record: what the node knows of one attachment, as stored in
//! `<state-dir>/endpoints/<containerID>_<ifname>.json`. Pure.
//!
//! ```text
//!  ADD: allocate ─▶ Record{Adding} ─▶ veth, addresses, routes, neighbours ─▶ Record{Ready}
//!       (a restart finds Adding only when the process died in between: no ADD
//!        survives a restart, so it rolls the attempt back)
//!  DEL: Record{Deleting} ─▶ routes ─▶ answer ─▶ veth ─▶ no record ─▶ addresses released
//!       (a restart finishes every Deleting it finds)
//! ```

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use trellis_cni::proto::{Attachment, Endpoint, PodRef};

use crate::model::Mac;

/// Version of the record format; a record of another version is refused
/// rather than misread.
pub const RECORD_VERSION: u32 = 1;

/// How far an ADD got.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Addresses allocated; the datapath may be partly made.
    Adding,
    /// Everything in place; the ADD answered.
    Ready,
    /// DEL answered: the pod's routes are gone, its veth may not be yet.
    /// Its addresses stay allocated until the veth is gone too, so no other
    /// pod can get them while anything of this one is left.
    Deleting,
}

/// One attachment's endpoint.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub version: u32,
    pub phase: Phase,
    pub attachment: Attachment,
    /// `CNI_NETNS` of the ADD.
    pub netns: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    pub host_ifname: String,
    /// The pod's addresses, /32 and /128.
    pub addresses: Vec<IpNet>,
    pub mtu: u32,
    /// MACs, known once the veth pair exists.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "mac")]
    pub host_mac: Option<Mac>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "mac")]
    pub mac: Option<Mac>,
}

impl Record {
    /// The endpoint as the CNI result reports it, once `Ready`.
    pub fn endpoint(&self) -> Option<Endpoint> {
        if self.phase != Phase::Ready {
            return None;
        }
        Some(Endpoint {
            attachment: self.attachment.clone(),
            netns: self.netns.clone(),
            host_ifname: self.host_ifname.clone(),
            host_mac: self.host_mac?.to_string(),
            mac: self.mac?.to_string(),
            mtu: self.mtu,
            addresses: self.addresses.clone(),
            pod: self.pod.clone(),
        })
    }

    /// Whether the record holds `ip` as one of the pod's addresses.
    pub fn owns(&self, ip: &std::net::IpAddr) -> bool {
        self.addresses.iter().any(|a| a.addr() == *ip)
    }

    /// The file's content.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings, numbers and addresses always serializes.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// A record read back; refuses another format version.
    pub fn decode(bytes: &[u8]) -> Result<Record, String> {
        let record: Record = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if record.version != RECORD_VERSION {
            return Err(format!(
                "record format version {} (this trellis-node reads {RECORD_VERSION})",
                record.version
            ));
        }
        Ok(record)
    }
}

/// MACs as `aa:bb:cc:dd:ee:ff` strings.
mod mac {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::model::Mac;

    pub fn serialize<S: Serializer>(mac: &Option<Mac>, s: S) -> Result<S::Ok, S::Error> {
        match mac {
            Some(m) => s.collect_str(m),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Mac>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| s.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    pub(crate) fn mk_record(phase: Phase) -> Record {
        Record {
            version: RECORD_VERSION,
            phase,
            attachment: Attachment {
                container_id: "c0ffee".into(),
                ifname: "eth0".into(),
            },
            netns: "/run/netns/pod".into(),
            pod: Some(PodRef {
                namespace: "default".into(),
                name: "web-0".into(),
                uid: None,
            }),
            host_ifname: "trellis0011aabb".into(),
            addresses: vec!["10.244.1.5/32".parse().unwrap()],
            mtu: 1450,
            host_mac: (phase == Phase::Ready).then_some(Mac([2, 0, 0, 0, 0, 1])),
            mac: (phase == Phase::Ready).then_some(Mac([2, 0, 0, 0, 0, 2])),
        }
    }

    #[test]
    fn records_round_trip_in_the_documented_shape() {
        let r = mk_record(Phase::Ready);
        let bytes = r.encode();
        assert!(bytes.ends_with(b"}\n"));
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "version": 1, "phase": "Ready",
                "attachment": {"containerID": "c0ffee", "ifname": "eth0"},
                "netns": "/run/netns/pod",
                "pod": {"namespace": "default", "name": "web-0"},
                "hostIfname": "trellis0011aabb",
                "addresses": ["10.244.1.5/32"],
                "mtu": 1450,
                "hostMac": "02:00:00:00:00:01",
                "mac": "02:00:00:00:00:02",
            })
        );
        assert_eq!(Record::decode(&bytes).unwrap(), r);
        assert!(r.owns(&"10.244.1.5".parse().unwrap()));
        assert!(!r.owns(&"10.244.1.6".parse().unwrap()));
        let ep = r.endpoint().unwrap();
        assert_eq!((ep.mac.as_str(), ep.mtu), ("02:00:00:00:00:02", 1450));
    }

    #[test]
    fn an_adding_record_has_no_endpoint_and_bad_files_say_why() {
        let adding = mk_record(Phase::Adding);
        assert_eq!(adding.endpoint(), None);
        let back = Record::decode(&adding.encode()).unwrap();
        assert_eq!(back, adding);

        let mut future = serde_json::to_value(&adding).unwrap();
        future["version"] = 2.into();
        let err = Record::decode(future.to_string().as_bytes()).unwrap_err();
        assert!(err.contains("version 2"), "{err}");
        assert!(Record::decode(b"{\"version\": 1").is_err());
        let mut bad_mac = serde_json::to_value(mk_record(Phase::Ready)).unwrap();
        bad_mac["mac"] = "zz".into();
        let err = Record::decode(bad_mac.to_string().as_bytes()).unwrap_err();
        assert!(err.contains("is not a MAC address"), "{err}");
    }
}
