//! `twin bench`: protected vs unprotected, measured side by side (to be written).

use std::process::ExitCode;

use anyhow::Result;

#[derive(clap::Args)]
pub struct BenchArgs {}

pub fn run(_args: BenchArgs) -> Result<ExitCode> {
    anyhow::bail!("twin bench is not written yet")
}
