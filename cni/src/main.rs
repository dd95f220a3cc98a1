//! `trellis`: the CNI plugin the container runtime executes.
//!
//! ```text
//!  runtime ──(CNI_* env + config on stdin)──▶ trellis ──(unix socket)──▶ trellis-node
//!          ◀──(result or error JSON, exit 0/1)──
//! ```
//!
//! Everything but reading the process environment and stdin and writing
//! stdout lives in the library (`trellis_cni`).

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use trellis_cni::client::UnixTransport;
use trellis_cni::config::{self, MAX_CONFIG};
use trellis_cni::env::{self, CNI_COMMAND, CniCommand};
use trellis_cni::{Failure, invocation, plugin};

fn main() -> ExitCode {
    match run() {
        Ok(output) => {
            if let Some(json) = output
                && writeln!(io::stdout().lock(), "{json}").is_err()
            {
                // The runtime could not read our result: that is a failure.
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(failure) => {
            // Nothing more to do if stdout is gone: the exit code says it.
            let _ = writeln!(io::stdout().lock(), "{}", failure.to_json());
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<Option<String>, Failure> {
    let vars = env::from_os(std::env::vars_os()).map_err(|e| Failure::new(None, e))?;
    let command = vars
        .get(CNI_COMMAND)
        .map(String::as_str)
        .unwrap_or_default();
    let version = command == CniCommand::Version.as_str();
    let stdin = io::stdin();
    if command.is_empty() && stdin.is_terminal() {
        // Run by hand: say what this is instead of waiting for a configuration.
        // Unlike eprintln!, a failing stderr is no reason to panic.
        let _ = writeln!(
            io::stderr(),
            "trellis: the Trellis CNI plugin, run by container runtimes (CNI {})",
            config::SUPPORTED_VERSIONS.join(", ")
        );
    }
    // VERSION needs no configuration, and neither does a missing command
    // (an error anyway): don't wait on a terminal for one, and don't fail
    // VERSION on an unreadable stdin.
    let input = if (version || command.is_empty()) && stdin.is_terminal() {
        Vec::new()
    } else {
        match config::read_stdin(stdin.lock(), MAX_CONFIG) {
            Ok(input) => input,
            Err(_) if version => Vec::new(),
            Err(e) => return Err(Failure::new(None, e)),
        }
    };
    let inv = invocation::parse(&vars, &input)?;
    plugin::execute(&inv, &mut UnixTransport)
}
