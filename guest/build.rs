//! Link the guest as a freestanding static executable at 0x100000 (see `link.ld`).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    for arg in [
        "-nostartfiles".to_string(),
        "-static".to_string(),
        "-no-pie".to_string(),
        format!("-Wl,-T{dir}/link.ld"),
        "-Wl,--build-id=none".to_string(),
        "-Wl,-z,norelro".to_string(),
        "-Wl,-z,noexecstack".to_string(),
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
}
