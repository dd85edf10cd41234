//! `twin demo` and `twin bench`: thin entry points into the lab binary, `twin-lab`.
//!
//! The demo and the bench build network namespaces with the test harness and draw plots;
//! they live in the `twin-lab` crate (`lab/`) so that this binary links neither. These
//! commands replace this process with `twin-lab <command> <args…>` found next to this
//! executable, telling it (`TWIN_BIN`) which `twin` to run its VMs with.
//!
//! Started by `cargo run` (the README's `cargo run --release -- demo`), the lab binary is
//! first built by cargo in the same profile — so it exists on a fresh clone and is never older
//! than this one. Anywhere else a missing lab binary is an error naming the command that
//! builds it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

/// The lab's executable, built by the `twin-lab` package.
const LAB_BIN: &str = "twin-lab";

/// Everything after `twin demo` / `twin bench`, handed to the lab as it is (`--help` too).
#[derive(clap::Args)]
pub struct LabArgs {
    /// Options of the command (`twin demo --help`, `twin bench --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

/// Replaces this process with `twin-lab <command> <args…>`; returns only on failure.
pub fn exec(command: &str, args: &LabArgs) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot locate this twin binary")?;
    let dir = exe
        .parent()
        .context("this twin binary is not in a directory")?;
    let lab = dir.join(LAB_BIN);
    if let Some(cargo) = launched_by_cargo() {
        build_with_cargo(&cargo, dir)?;
    }
    if !lab.is_file() {
        if !in_target_dir(dir) {
            bail!(
                "`twin {command}` runs the lab binary {}, which is missing: build it with \
                 `cargo build --release -p twin-lab` and put target/release/{LAB_BIN} next to \
                 this twin",
                lab.display()
            );
        }
        bail!(
            "`twin {command}` runs the lab binary {}, which is not built: build it with `{}` \
             (or run `cargo run{} -- {command}`)",
            lab.display(),
            build_command(dir).join(" "),
            profile_args(dir)
                .iter()
                .map(|a| format!(" {a}"))
                .collect::<String>()
        );
    }
    let mut cmd = Command::new(&lab);
    // Its usage and messages then read `twin demo …`, as the command was typed.
    cmd.arg0("twin").arg(command).args(&args.args);
    if std::env::var_os("TWIN_BIN").is_none() {
        cmd.env("TWIN_BIN", &exe);
    }
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot run {}", lab.display()))
}

/// The cargo that started this process with `cargo run`, if it did: cargo sets `CARGO` and
/// the package's manifest directory for the program it runs.
fn launched_by_cargo() -> Option<Manifest> {
    let cargo = std::env::var_os("CARGO")?;
    if std::env::var_os("CARGO_PKG_NAME")? != "twin" {
        return None;
    }
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?).join("Cargo.toml");
    manifest.is_file().then_some(Manifest {
        cargo: cargo.into(),
        manifest,
    })
}

/// Cargo and the manifest of the `twin` package it ran.
struct Manifest {
    cargo: PathBuf,
    manifest: PathBuf,
}

/// `cargo build -p twin-lab` in the profile of the directory this binary is in.
fn build_with_cargo(cargo: &Manifest, dir: &Path) -> Result<()> {
    let mut cmd = Command::new(&cargo.cargo);
    cmd.args(["build", "-p", "twin-lab", "--bin", LAB_BIN])
        .args(profile_args(dir))
        .arg("--manifest-path")
        .arg(&cargo.manifest);
    // Without what `cargo run` set for this program: build scripts that track those
    // variables (ring's does) would otherwise see another environment than the build of
    // `twin` did, and every `cargo run` would rebuild them twice.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| {
            k.starts_with("CARGO_PKG_") || k == "CARGO_MANIFEST_DIR" || k == "CARGO_MANIFEST_PATH"
        }) {
            cmd.env_remove(key);
        }
    }
    eprintln!(
        "twin: building the lab binary ({})",
        build_command(dir).join(" ")
    );
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", cargo.cargo.display()))?;
    if !status.success() {
        bail!("building the lab binary failed ({status})");
    }
    Ok(())
}

/// Whether `dir` is a profile directory of a cargo target directory (which cargo marks
/// with a `CACHEDIR.TAG`).
fn in_target_dir(dir: &Path) -> bool {
    dir.parent()
        .is_some_and(|t| t.join("CACHEDIR.TAG").is_file())
}

/// The command that builds the lab binary next to this one.
fn build_command(dir: &Path) -> Vec<String> {
    let mut c: Vec<String> = ["cargo", "build", "-p", "twin-lab"]
        .map(String::from)
        .into();
    c.extend(profile_args(dir));
    c
}

/// Cargo's profile flags for a binary in `dir` (`target/release`, `target/debug`,
/// `target/<profile>`).
fn profile_args(dir: &Path) -> Vec<String> {
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => Vec::new(),
        Some(p) if p != "release" => vec!["--profile".into(), p.into()],
        _ => vec!["--release".into()],
    }
}
