//! `twin demo`: the whole story on one machine (to be written).

use std::process::ExitCode;

use anyhow::Result;

#[derive(clap::Args)]
pub struct DemoArgs {}

pub fn run(_args: DemoArgs) -> Result<ExitCode> {
    anyhow::bail!("twin demo is not written yet")
}
