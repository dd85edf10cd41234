//! `twin-lab`: the demo and the bench, which build network namespaces with the harness (this
//! crate's library) and run real `twin` processes in them. A binary of its own so that the
//! `twin` product binary links neither the harness nor plotters; `twin demo` and `twin bench`
//! run this one (the `twin` it starts is `$TWIN_BIN`, or the one next to it).

mod bench;
mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "twin-lab",
    version,
    about = "The Twin lab: the failover demo and the bench (run as `twin demo`, `twin bench`)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Demonstrate a failover on this machine: namespaces, primary, backup, client, SIGKILL.
    Demo(demo::DemoArgs),
    /// Measure protected against unprotected runs and write a report.
    Bench(Box<bench::BenchArgs>),
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(*args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line naming the problem, with its causes (as `twin` itself says it).
            eprintln!("twin: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TWIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}
