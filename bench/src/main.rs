//! `canal-bench`: load generator for canal's WebSocket endpoints.
//!
//! Scenarios: `idle` (server memory per idle connection), `echo` (closed-loop round trips),
//! `fanout` (one sender, many receivers in a room). Traffic goes to loopback addresses only.
//! See README.md.

mod echo;
mod fanout;
mod idle;
mod procfs;
mod util;
mod ws;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "canal-bench",
    version,
    about = "Load generator for canal (loopback only)"
)]
struct Cli {
    /// Print the result as one JSON object instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Step through connection counts of mostly idle chat clients; server RSS per connection.
    Idle(idle::IdleArgs),
    /// Closed-loop echo round trips: throughput, latency, server CPU per message.
    Echo(echo::EchoArgs),
    /// One sender, many receivers in one room: deliveries/s, loss, order, latency.
    Fanout(fanout::FanoutArgs),
    /// Internal: a process holding a share of the `idle` connections.
    #[command(hide = true)]
    IdleWorker(idle::WorkerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (result, printer): (Result<serde_json::Value, String>, fn(&serde_json::Value)) =
        match cli.scenario {
            Scenario::IdleWorker(a) => {
                return match idle::worker(a) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("canal-bench idle-worker: {e}");
                        ExitCode::FAILURE
                    }
                };
            }
            Scenario::Idle(a) => (idle::run(a), idle::print),
            Scenario::Echo(a) => {
                let rt = util::runtime(a.threads());
                (rt.block_on(echo::run(a)), echo::print)
            }
            Scenario::Fanout(a) => {
                let rt = util::runtime(a.threads());
                (rt.block_on(fanout::run(a)), fanout::print)
            }
        };
    match result {
        Ok(v) => {
            if cli.json {
                println!("{v}");
            } else {
                printer(&v);
            }
            if v.get("error").is_some_and(|e| !e.is_null()) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("canal-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
