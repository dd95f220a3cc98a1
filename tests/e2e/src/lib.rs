//! Trellis sandbox: a real Kubernetes control plane on this machine for end-to-end tests and
//! for poking at by hand (`trellis-sandbox up`).
//!
//! ```text
//!                       <state dir>  (Sandbox: pids, logs, pki, kubeconfig, endpoints)
//!                            │
//!  build.sh ─► binaries ─► ControlPlane::start
//!                            ├─ certs       CA, apiserver serving cert, admin client cert, SA key
//!                            ├─ etcd        127.0.0.1:<free>, data in the state dir
//!                            ├─ apiserver   https://127.0.0.1:<free>, ready on /readyz
//!                            ├─ crds        config/crd/*.yaml, server-side applied, Established
//!                            ├─ namespace   trellis-system                     (if asked)
//!                            ├─ nodes       Node objects trellis-node-<i>, 192.0.2.<10+i>
//!                            └─ operator    trellis-operator, ready on its /readyz (if asked)
//!                            │
//!                   kube::Client / kubectl --kubeconfig <state>/kubeconfig
//! ```
//!
//! Processes run detached and are recorded by pid in the state directory, so the CLI can exit
//! while they keep running, and `down` (or the next `up`) ends exactly those pids. In tests,
//! [`ControlPlane`] ends them on drop; every test gets its own state dir and free ports.

#![forbid(unsafe_code)]

pub mod binaries;
pub mod certs;
pub mod controlplane;
pub mod crds;
pub mod error;
pub mod kubeconfig;
pub mod nodes;
pub mod operator;
pub mod process;
pub mod sandbox;
pub mod wait;

pub use binaries::{Binaries, Tool};
pub use controlplane::{ControlPlane, Phase, StartOptions};
pub use error::{Error, Result};
pub use nodes::{NodeSpec, Nodes};
pub use operator::OperatorOptions;
pub use sandbox::{Endpoints, Sandbox, Status};
pub use wait::wait_for;
