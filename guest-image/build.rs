//! Build the guest (`../guest`, a separate `no_std` workspace with `panic = "abort"`) with
//! the host toolchain and put its ELF in `OUT_DIR` for `include_bytes!`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guest_dir = manifest_dir.join("..").join("guest");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    for path in ["Cargo.toml", "Cargo.lock", "build.rs", "link.ld", "src"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(path).display());
    }

    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // The child's stdout must not be read as build-script directives.
        .stdout(Stdio::from(std::io::stderr()));
    // Nothing of the outer build may leak into the guest's: no flags or wrappers meant for
    // host crates (clippy's driver, `-C target-cpu=native` — the guest may only assume
    // SSE2), no jobserver, no outer profile or feature settings.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PROFILE_")
            || key.starts_with("CARGO_FEATURE_")
            || key.starts_with("CARGO_CFG_")
            || key.starts_with("CARGO_TARGET_")
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BUILD_")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "RUSTDOCFLAGS"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "RUSTC_LINKER"
                    | "CLIPPY_ARGS"
                    | "CARGO_MAKEFLAGS"
                    | "MAKEFLAGS"
                    | "MFLAGS"
                    | "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_CRATE_NAME"
                    | "OUT_DIR"
                    | "TARGET"
                    | "HOST"
                    | "PROFILE"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "NUM_JOBS"
            )
        {
            cmd.env_remove(key);
        }
    }
    // Set (empty) so that `rustflags` from any `.cargo/config.toml` are ignored as well.
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "");

    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the guest: {e}"));
    if !status.success() {
        panic!(
            "building the guest ({}) failed: {status}",
            guest_dir.join("Cargo.toml").display()
        );
    }

    let elf = target_dir.join("release").join("twin-guest");
    let dest = out_dir.join("twin-guest.elf");
    copy(&elf, &dest);
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
}
