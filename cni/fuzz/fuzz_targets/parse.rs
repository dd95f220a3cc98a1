//! Fuzzes `trellis_cni::parse`, the pure entry point from the `CNI_*`
//! environment and stdin to a validated invocation or the error to print.
//!
//! Input format (so seeds can be written by hand): `KEY=VALUE` lines, an
//! empty line, then stdin. Without the empty line everything is environment.
//!
//! Beyond "never panics", each outcome is checked:
//! - an error has a code `parse` documents, and renders as the spec's error
//!   JSON with a supported `cniVersion`;
//! - an invocation serializes; its request survives the protocol's JSON round
//!   trip; a prevResult re-encodes to itself; and for ADD, the result we would
//!   print for an endpoint on that attachment passes our own CHECK.

#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_cni::config::SUPPORTED_VERSIONS;
use trellis_cni::env::Vars;
use trellis_cni::invocation::PARSE_ERROR_CODES;
use trellis_cni::proto::{Endpoint, Request};
use trellis_cni::{ErrorResult, Invocation, parse, result};

fuzz_target!(|data: &[u8]| {
    let (env_part, stdin) = split(data);
    let vars = vars(env_part);
    match parse(&vars, stdin) {
        Err(failure) => {
            assert!(
                PARSE_ERROR_CODES.contains(&failure.code()),
                "undocumented code {}: {failure}",
                failure.code()
            );
            let json = failure.to_json();
            let back: ErrorResult = serde_json::from_str(&json).expect("error JSON decodes");
            assert_eq!(back.code, failure.code());
            assert!(
                SUPPORTED_VERSIONS.contains(&back.cni_version.as_str()),
                "{json}"
            );
            assert!(!back.msg.is_empty(), "{json}");
        }
        Ok(inv) => check_invocation(&inv),
    }
});

fn split(data: &[u8]) -> (&[u8], &[u8]) {
    match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[]),
    }
}

fn vars(env: &[u8]) -> Vars {
    String::from_utf8_lossy(env)
        .split('\n')
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn check_invocation(inv: &Invocation) {
    let json = serde_json::to_string(inv).expect("invocation serializes");
    serde_json::from_str::<serde_json::Value>(&json).expect("invocation JSON decodes");
    assert_eq!(
        inv.conf().is_none(),
        matches!(inv, Invocation::Version { .. })
    );
    if let Some(request) = inv.request() {
        let line = serde_json::to_vec(&request).expect("request serializes");
        let back: Request = serde_json::from_slice(&line).expect("request decodes");
        assert_eq!(back, request);
    }
    match inv {
        Invocation::Version { cni_version } => {
            let out = trellis_cni::plugin::version_json(cni_version);
            serde_json::from_str::<serde_json::Value>(&out).expect("VERSION JSON decodes");
        }
        Invocation::Check { prev_result, .. } => {
            let value = serde_json::to_value(prev_result).expect("prevResult serializes");
            let back = result::parse_prev(&value).expect("prevResult re-parses");
            assert_eq!(&back, prev_result);
        }
        Invocation::Add {
            conf,
            attachment,
            netns,
            pod,
            ..
        } => {
            let endpoint = Endpoint {
                attachment: attachment.clone(),
                netns: netns.clone(),
                host_ifname: "trellis00000001".into(),
                host_mac: "02:00:00:00:00:01".into(),
                mac: "02:00:00:00:00:02".into(),
                mtu: 1450,
                addresses: vec![
                    "10.244.0.7/32".parse().expect("literal"),
                    "fd00::7/128".parse().expect("literal"),
                ],
                pod: pod.clone(),
            };
            let printed = result::from_endpoint(&endpoint).for_version(conf.cni_version);
            let value = serde_json::to_value(&printed).expect("result serializes");
            let prev = result::parse_prev(&value).expect("our result parses as prevResult");
            result::compare(&prev, &endpoint).expect("our own result passes CHECK");
        }
        Invocation::Del { .. } | Invocation::Status { .. } | Invocation::Gc { .. } => {}
    }
}
