//! Trellis sandbox: a real Kubernetes control plane on this machine for end-to-end tests and
//! for poking at by hand (`trellis-sandbox up`).
//!
//! ```text
//!                       <state dir>  (Sandbox: pids, logs, pki, kubeconfig, endpoints, netns records)
//!                            │
//!  build.sh ─► binaries ─► ControlPlane::start
//!                            ├─ certs       CA, apiserver serving cert, admin client cert, SA key
//!                            ├─ etcd        127.0.0.1:<free>, data in the state dir
//!                            ├─ apiserver   https://127.0.0.1:<free>, ready on /readyz
//!                            ├─ crds        config/crd/*.yaml, server-side applied, Established
//!                            ├─ namespace   trellis-system                     (if asked)
//!                            ├─ rbac        config/rbac: ServiceAccounts, roles, admission policy
//!                            │              (kubectl apply; with an operator or a datapath)
//!                            ├─ underlay    netns trellis-<tag>-underlay, bridge trellis-br0,
//!                            │              bpffs at <state>/bpffs             (if datapath)
//!                            ├─ nodes       Node objects trellis-node-<i>, 192.0.2.<10+i>,
//!                            │              + netns trellis-<tag>-<node> on the underlay
//!                            ├─ operator    trellis-operator, ready on its /readyz (if asked),
//!                            │              with its own ServiceAccount token (crate::access)
//!                            └─ agents      trellis-node per node, ready on /healthz (if asked),
//!                                           each with a token bound to its Node; each writes
//!                                           <state>/nodes/<node>/net.d/*.conflist
//!                            │
//!                   kube::Client / kubectl --kubeconfig <state>/kubeconfig
//!
//!  Pods::add ─► Pod (spec.nodeName) ─► netns trellis-<tag>-pod_<ns>_<name>
//!            ─► cni_runtime: the node's conflist, CNI ADD as a container runtime runs it
//!            ─► Pod status (Running, podIPs) as a kubelet writes it
//!
//!  cluster::start_cluster, add_pods ─► a cluster with pods: where the policy tests and
//!                  benchmarks start
//!  truth::World ─► namespaces x y z × pods a b c serving TCP/UDP 80, 81 ─► NetworkPolicy
//!                  truth tables: probes vs an independent oracle (crate::truth)
//! ```
//!
//! Processes run detached and are recorded by pid in the state directory, so the CLI can exit
//! while they keep running, and `down` (or the next `up`) ends exactly those pids. Network
//! namespaces are recorded there too and deleted by name. In tests, [`ControlPlane`] ends and
//! deletes them on drop; every test gets its own state dir, free ports and namespace names.

#![forbid(unsafe_code)]

pub mod access;
pub mod agent;
pub mod binaries;
pub mod bpffs;
pub mod certs;
pub mod cluster;
pub mod cni_runtime;
pub mod controlplane;
pub mod crds;
pub mod datapath;
pub mod error;
pub mod kubeconfig;
pub mod nodes;
pub mod operator;
pub mod pods;
pub mod process;
pub mod samples;
pub mod sandbox;
pub mod support;
pub mod truth;
pub mod wait;

pub use agent::{Agent, AgentOptions};
pub use binaries::{Binaries, CargoBinary, Tool};
pub use cni_runtime::{CniError, NetworkConfigList, Runtime, RuntimeConf};
pub use controlplane::{ControlPlane, Phase, StartOptions};
pub use datapath::{DatapathConfig, NodeDatapath};
pub use error::{Error, Result};
pub use nodes::{NodeSpec, Nodes};
pub use operator::OperatorOptions;
pub use pods::{ContainerPort, Pod, PodName, PodSpec, Pods};
pub use sandbox::{Endpoints, NodeDirs, Sandbox, Status};
pub use wait::wait_for;
