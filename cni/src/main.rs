//! `trellis`: the CNI plugin the container runtime executes.
//!
//! ```text
//!  runtime ──(CNI_* env + config on stdin)──▶ trellis ──(unix socket)──▶ trellis-node
//!          ◀──(result or error JSON)─────────
//! ```
//!
//! The plugin arrives with the CNI issue; until then it answers every command
//! with the spec's error JSON (code 999), so a runtime never mistakes it for a
//! working plugin.

fn main() {
    println!(
        r#"{{"cniVersion":"1.1.0","code":999,"msg":"the trellis CNI plugin is not built yet","details":"trellis {} is a placeholder"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(1);
}
