//! `trellis-probe`: one cell of a NetworkPolicy truth table, by hand. The same server and probe
//! as the truth-table tests (`trellis_e2e::truth::traffic`), in the network namespace it is
//! started in, e.g. in a sandbox pod:
//!
//! ```text
//! S=target/debug/trellis-sandbox; P=$PWD/target/debug/trellis-probe
//! $S pod exec b -n y -- $P serve --name y/b --port 80 --port 81 &   # TCP and UDP on each
//! $S pod exec a -n x -- $P probe tcp 10.244.1.2:80                   # "answered by y/b", exit 0
//! $S pod exec a -n x -- $P probe udp 10.244.1.2:81 --expect y/b --timeout-ms 500
//! ```
//!
//! `probe` exits 0 when the server answered (with the `--expect`ed name, if given), 1 when it
//! did not: silence (a dropped packet), a refusal, or the wrong pod.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use trellis_e2e::truth::{Protocol, traffic};

#[derive(Parser)]
#[command(
    name = "trellis-probe",
    about = "Serve TCP/UDP ports answering with a name, or probe one, as the NetworkPolicy \
             truth-table tests do"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve TCP and UDP on each port, answering every connection and datagram with NAME.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
    },
    /// Open one connection to ADDRESS (ip:port) and print who answered.
    Probe {
        protocol: Proto,
        address: SocketAddr,
        /// Fail unless this name answers.
        #[arg(long)]
        expect: Option<String>,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve { name, ports } => match traffic::serve(None, &name, &ports).await {
            Ok(servers) => {
                eprintln!("serving {name} on TCP and UDP {ports:?}");
                servers.run().await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: serve {ports:?}: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Probe {
            protocol,
            address,
            expect,
            timeout_ms,
        } => {
            let protocol = match protocol {
                Proto::Tcp => Protocol::Tcp,
                Proto::Udp => Protocol::Udp,
            };
            let seen =
                traffic::probe(None, protocol, address, Duration::from_millis(timeout_ms)).await;
            println!("{protocol} {address}: {seen}");
            let ok = match (&seen, &expect) {
                (traffic::Observed::Answered(_), None) => true,
                (_, Some(name)) => seen.is_allowed(name),
                _ => false,
            };
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
